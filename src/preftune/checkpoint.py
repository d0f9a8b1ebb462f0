"""Atomic checkpoints and exact resume.

A checkpoint is ``checkpoints/step-N/`` with the policy weights (``model.safetensors``) and the
training state (``state.pt``: optimizer, scheduler, RNG states, counters). It is written into a
temporary sibling folder, fsynced, then renamed; the ``latest`` marker is replaced last. A crash
at any moment therefore leaves the previous checkpoint complete and ``latest`` pointing to it.
Training state is read back with ``torch.load(weights_only=True)``: no pickle of arbitrary code.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.pt"
WEIGHTS_FILE = "model.safetensors"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message is one line for users."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path, step: int, model: torch.nn.Module, state: dict[str, Any], keep: int
) -> Path:
    """Write ``run_dir/checkpoints/step-{step}`` atomically, point ``latest`` at it, prune."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    for stale in root.glob(".step-*.tmp"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".step-{step}.tmp"
    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # Tied weights share storage; safetensors wants each tensor once.
    seen: dict[int, str] = {}
    for name in list(weights):
        ptr = weights[name].data_ptr()
        if ptr in seen:
            del weights[name]
        else:
            seen[ptr] = name
    save_file(weights, tmp / WEIGHTS_FILE)
    torch.save(state, tmp / STATE_FILE)
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # a step re-done after resuming from an older checkpoint
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    marker = root / f".{LATEST}.tmp"
    marker.write_text(final.name + "\n")
    _fsync(marker)
    os.replace(marker, root / LATEST)
    _fsync(root)
    for old in sorted(_complete(root), key=_step_of)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def _complete(root: Path) -> list[Path]:
    return [p for p in root.glob("step-*")
            if p.name.removeprefix("step-").isdigit()
            and (p / STATE_FILE).is_file() and (p / WEIGHTS_FILE).is_file()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, else the highest complete one, else None."""
    root = run_dir / "checkpoints"
    marker = root / LATEST
    if marker.is_file():
        named = root / marker.read_text().strip()
        if named in _complete(root):
            return named
    found = _complete(root) if root.is_dir() else []
    return max(found, key=_step_of) if found else None


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load weights into ``model`` (in place) and return the saved training state."""
    if not (path / STATE_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"resume: {path} is not a complete checkpoint "
                              f"(needs {WEIGHTS_FILE} and {STATE_FILE})")
    weights = load_file(path / WEIGHTS_FILE)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Only tied duplicates may be missing: they were stored once.
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.named_parameters()}
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"resume: {path} does not match the model "
                              f"(missing {sorted(set(missing) - tied)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")
    return torch.load(path / STATE_FILE, weights_only=True)
