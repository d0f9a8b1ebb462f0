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

from .distributed import World, barrier, load_sharded, save_sharded

STATE_FILE = "state.pt"
DCP_DIR = "dcp"
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
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
    world: World | None = None,
) -> Path:
    """Write ``run_dir/checkpoints/step-{step}`` atomically, point ``latest`` at it, prune.

    One process writes ``model.safetensors`` + ``state.pt``; N processes (FSDP2) write their
    shards of model and optimizer as a DCP checkpoint in ``dcp/`` and rank 0 the ``state.pt``.
    Call it on every rank.
    """
    world = world or World()
    root = run_dir / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    if world.main:
        root.mkdir(parents=True, exist_ok=True)
        _remove_half_written(root)
        tmp.mkdir()
    barrier(world)
    if world.distributed:
        save_sharded(tmp / DCP_DIR, model, optimizer)
    else:
        save_file(_dedup_tied(_trained_weights(model)), tmp / WEIGHTS_FILE)
        state = {**state, "optimizer": optimizer.state_dict()}
    barrier(world)
    if world.main:
        torch.save(state, tmp / STATE_FILE)
        for f in tmp.rglob("*"):
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
        prune_checkpoints(run_dir, keep)
    barrier(world)
    return final


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Remove half-written folders and every step folder older than the newest ``keep``
    complete ones, complete or not.

    Called after each save and again on resume: a crash between ``latest`` moving and the
    prune (or mid-prune) leaves older folders behind, and a resumed run may save no more.
    """
    root = run_dir / "checkpoints"
    _remove_half_written(root)
    complete = sorted(_complete(root), key=_step_of) if root.is_dir() else []
    if not complete:
        return
    oldest_kept = _step_of(complete[-keep:][0])
    for old in root.glob("step-*"):
        if old.name.removeprefix("step-").isdigit() and _step_of(old) < oldest_kept:
            shutil.rmtree(old, ignore_errors=True)


def _remove_half_written(root: Path) -> None:
    for stale in root.glob(".step-*.tmp"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)


def _trained_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state, or only the trainable parameters when some are frozen (LoRA): frozen
    weights come back from the base model, so checkpoints stay adapter-sized."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if not frozen:
        return model.state_dict()
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _dedup_tied(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tied weights share storage; safetensors stores each tensor once."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in weights.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[name] = tensor.detach().contiguous().cpu()
    return out


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step-"))


def _is_complete(path: Path) -> bool:
    weights = (path / WEIGHTS_FILE).is_file() or (path / DCP_DIR / ".metadata").is_file()
    return (path / STATE_FILE).is_file() and weights


def _complete(root: Path) -> list[Path]:
    return [p for p in root.glob("step-*")
            if p.name.removeprefix("step-").isdigit() and _is_complete(p)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, else the highest complete one, else None."""
    root = run_dir / "checkpoints"
    marker = root / LATEST
    if marker.is_file():
        named = root / marker.read_text().strip()
        if _is_complete(named):
            return named
    found = _complete(root) if root.is_dir() else []
    return max(found, key=_step_of) if found else None


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Load weights (and optimizer state) in place; return the rest of the training state.

    A DCP checkpoint loads into any number of processes, one included (resharding)."""
    if not _is_complete(path):
        raise CheckpointError(f"resume: {path} is not a complete checkpoint "
                              f"(needs {STATE_FILE} and {WEIGHTS_FILE} or {DCP_DIR}/)")
    state = torch.load(path / STATE_FILE, weights_only=True)
    if (path / DCP_DIR).is_dir():
        if optimizer is None:
            raise CheckpointError(f"resume: {path} is sharded; loading it needs the optimizer")
        load_sharded(path / DCP_DIR, model, optimizer)
        return state
    missing, unexpected = model.load_state_dict(load_file(path / WEIGHTS_FILE), strict=False)
    # Only tied duplicates may be missing: they were stored once.
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.named_parameters()}
    tied |= {n for n, p in model.named_parameters() if not p.requires_grad}  # see _trained_weights
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"resume: {path} does not match the model "
                              f"(missing {sorted(set(missing) - tied)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return state
