"""Atomic checkpoints and exact resume.

A checkpoint is ``checkpoints/step-N/`` with the policy weights (``model.safetensors``) and the
training state (``state.pt``: optimizer, scheduler, RNG states, counters). It is written into a
temporary sibling folder, fsynced, then renamed; the ``latest`` marker is replaced last. A crash
at any moment therefore leaves the previous checkpoint complete and ``latest`` pointing to it.

Each checkpoint carries ``manifest.json``: its kind (``single``: one process wrote
``model.safetensors``; ``sharded``: N processes wrote a DCP folder ``dcp/``) and the size and
SHA-256 of every file, so damage is found before anything loads. Nothing read back runs code:
weights are safetensors, training state is read with ``torch.load(weights_only=True)``, a
``single`` checkpoint never reads ``dcp/``, and DCP metadata goes through a restricted
unpickler (``distributed.read_dcp_metadata``). The checksums catch damage, not tampering: whoever
can write the files can rewrite the manifest, which is why no file is trusted to be benign.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .distributed import World, barrier, load_sharded, read_dcp_metadata, save_sharded
from .io import atomic_write, publish_dir
from .tracking import warn

STATE_FILE = "state.pt"
DCP_DIR = "dcp"
WEIGHTS_FILE = "model.safetensors"
LATEST = "latest"
MANIFEST = "manifest.json"
SINGLE, SHARDED = "single", "sharded"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message is one line for users."""


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
    Rank 0 then adds the manifest. Call it on every rank. A full disk raises a one-line
    :class:`CheckpointError` after removing the half-written folder.
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
    try:
        _write_checkpoint(tmp, model, optimizer, state, world)
        if world.main:
            _publish(tmp, final, root)
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise  # as if killed: the next save or resume removes what is left
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        if out_of_space(e):
            raise CheckpointError(
                f"{root}: no space left on the device for checkpoint {final.name} "
                f"({free_gb(root):.2f} GB free); removed the partial checkpoint") from None
        raise
    if world.main:
        prune_checkpoints(run_dir, keep)
    barrier(world)
    return final


def _write_checkpoint(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      state: dict[str, Any], world: World) -> None:
    if world.distributed:
        save_sharded(tmp / DCP_DIR, model, optimizer)
    else:
        save_file(_dedup_tied(_trained_weights(model)), tmp / WEIGHTS_FILE)
        state = {**state, "optimizer": optimizer.state_dict()}
    barrier(world)
    if world.main:
        with open(tmp / STATE_FILE, "wb") as f:  # a Python file: a full disk raises OSError
            torch.save(state, f)
        _write_manifest(tmp, SHARDED if world.distributed else SINGLE)


def _publish(tmp: Path, final: Path, root: Path) -> None:
    """fsync the written folder, rename it into place, then move ``latest`` to it."""
    if final.exists():  # a step re-done after resuming from an older checkpoint
        shutil.rmtree(final)
    publish_dir(tmp, final)
    atomic_write(root / LATEST, lambda marker: marker.write_text(final.name + "\n"),
                 tmp=root / f".{LATEST}.tmp")


def _write_manifest(folder: Path, kind: str) -> None:
    """Record the kind and each file's size and SHA-256; written last, inside the temporary
    folder, so it is published by the same rename as the files it describes."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    with ThreadPoolExecutor(max_workers=min(8, len(files) or 1)) as pool:
        digests = list(pool.map(_sha256, files))  # hashlib releases the GIL on large reads
    manifest = {"format": 1, "kind": kind, "files": {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": d}
        for p, d in zip(files, digests, strict=True)}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# Rust (safetensors) reports the errno only in its message: "... (os error 28)".
_OS_ERROR = re.compile(r"os error (\d+)")


def out_of_space(error: BaseException) -> bool:
    """Whether ``error`` comes from a full disk or exhausted quota (ENOSPC, EDQUOT).

    torch.save raises a RuntimeError whose context is the OSError; DCP gathers the ranks'
    errors in a CheckpointException; safetensors names the errno in its message only.
    """
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        if any(int(n) in _NO_SPACE for n in _OS_ERROR.findall(str(e))):
            return True
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's exception
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return False


def free_gb(path: Path) -> float:
    """Free space on the file system holding ``path``, in GB (0 when it cannot be read)."""
    try:
        return shutil.disk_usage(path).free / 1e9
    except OSError:
        return 0.0


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
    candidates = _candidates(run_dir)
    return candidates[0] if candidates else None


def _candidates(run_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first: the one ``latest`` names, then older ones (newer
    ones beside it belong to a trajectory abandoned by an earlier resume=PATH)."""
    root = run_dir / "checkpoints"
    found = sorted(_complete(root), key=_step_of, reverse=True) if root.is_dir() else []
    marker = root / LATEST
    if marker.is_file():
        named = root / marker.read_text(errors="replace").strip()
        if named in found:
            return [named, *[p for p in found if _step_of(p) < _step_of(named)]]
    return found


def resume_point(run_dir: Path) -> Path | None:
    """For ``resume=true``: the newest checkpoint that verifies (see :func:`verify_checkpoint`),
    None when the run has none yet. Skipping a damaged one is said on stderr in one line; when
    none verifies, the newest one's problem is raised."""
    candidates = _candidates(run_dir)
    damaged: list[CheckpointError] = []
    for path in candidates:
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            damaged.append(e)
            continue
        if damaged and os.environ.get("RANK", "0") == "0":
            warn(f"{damaged[0]}; resuming from {path} instead")
        return path
    if damaged:
        raise CheckpointError(f"{damaged[0]}; no older checkpoint verifies either")
    return None


def checkpoint_kind(path: Path) -> str:
    """``single`` or ``sharded``, as the manifest records it. A checkpoint from before manifests
    is ``single`` whenever it has ``model.safetensors``: a DCP folder beside it is never read."""
    manifest = _read_manifest(path)
    if manifest is not None:
        return manifest["kind"]
    return SINGLE if (path / WEIGHTS_FILE).is_file() else SHARDED


def verify_checkpoint(path: Path) -> str:
    """Check ``path`` before loading anything from it; return its kind.

    With a manifest, every file it lists must exist with its size and SHA-256. Without one (a
    checkpoint written before manifests), what can be checked without loading is: the
    safetensors header against the file's length, the CRC of each entry of ``state.pt`` (a zip
    archive). The DCP metadata of a sharded one is read by the restricted unpickler.
    Raises CheckpointError.
    """
    path = Path(path)
    if not _is_complete(path):
        raise CheckpointError(f"resume: {path} is not a complete checkpoint "
                              f"(needs {STATE_FILE} and {WEIGHTS_FILE} or {DCP_DIR}/)")
    manifest = _read_manifest(path)
    signature = _signature(path, manifest)
    if _verified.get(path) == signature:
        return checkpoint_kind(path)
    if manifest is not None:
        _check_files(path, manifest)
    else:
        _check_legacy(path)
    kind = checkpoint_kind(path)
    if kind == SHARDED:
        _dcp_metadata(path)  # refused here, before DCP itself reads it
    _verified[path] = signature
    return kind


# Checkpoints verified by this process, with the size, mtime and inode of their files then:
# resume verifies once to choose, and loading does not hash everything a second time.
_verified: dict[Path, tuple] = {}


def _signature(path: Path, manifest: dict | None) -> tuple:
    names = sorted(manifest["files"]) if manifest else [
        p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    out = []
    for name in [MANIFEST, *names]:
        try:
            st = (path / name).stat()
            out.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            out.append((name, None))
    return tuple(out)


def _read_manifest(path: Path) -> dict | None:
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"resume: {file} is damaged ({_first_line(e)})") from None
    if not isinstance(manifest, dict) or manifest.get("kind") not in (SINGLE, SHARDED):
        raise CheckpointError(f"resume: {file} is damaged (no valid 'kind')")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            _safe_name(n) and isinstance(v, dict) and isinstance(v.get("size"), int)
            and isinstance(v.get("sha256"), str) for n, v in files.items()):
        raise CheckpointError(f"resume: {file} is damaged (no valid 'files')")
    needed = [STATE_FILE, WEIGHTS_FILE if manifest["kind"] == SINGLE else f"{DCP_DIR}/.metadata"]
    for name in needed:
        if name not in files:
            raise CheckpointError(f"resume: {file} does not list {name}")
    return manifest


def _safe_name(name: str) -> bool:
    """A relative path inside the checkpoint (a manifest may not point elsewhere)."""
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and ".." not in parts and "" not in parts


def _check_files(path: Path, manifest: dict) -> None:
    names = list(manifest["files"])
    for name in names:
        file, expected = path / name, manifest["files"][name]["size"]
        if not file.is_file():
            raise CheckpointError(f"resume: {file} is missing (listed in {MANIFEST})")
        if file.stat().st_size != expected:
            raise CheckpointError(f"resume: {file} is damaged ({file.stat().st_size} bytes, "
                                  f"{MANIFEST} says {expected})")
    with ThreadPoolExecutor(max_workers=min(8, len(names) or 1)) as pool:
        digests = list(pool.map(_sha256, [path / n for n in names]))
    for name, digest in zip(names, digests, strict=True):
        if digest != manifest["files"][name]["sha256"]:
            raise CheckpointError(f"resume: {path / name} is damaged (its SHA-256 differs from "
                                  f"{MANIFEST})")


def _check_legacy(path: Path) -> None:
    state = path / STATE_FILE
    try:
        with zipfile.ZipFile(state) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"resume: {state} is damaged ({_first_line(e)})") from None
    if bad is not None:
        raise CheckpointError(f"resume: {state} is damaged (entry {bad} fails its CRC)")
    if checkpoint_kind(path) == SINGLE:
        weights = path / WEIGHTS_FILE
        try:
            with safe_open(weights, framework="pt"):
                pass
        except (OSError, SafetensorError, ValueError) as e:
            raise CheckpointError(f"resume: {weights} is damaged ({_first_line(e)})") from None


def _dcp_metadata(path: Path):
    file = path / DCP_DIR / ".metadata"
    try:
        return read_dcp_metadata(file.parent)
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, RecursionError) as e:
        raise CheckpointError(f"resume: {file} is not DCP metadata ({_first_line(e)}); "
                              "refusing to load it") from None


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Verify, then load weights (and optimizer state) in place; return the rest of the
    training state. Every problem is a one-line CheckpointError naming the file.

    A sharded (DCP) checkpoint loads into any number of processes, one included (resharding)."""
    path = Path(path)
    kind = verify_checkpoint(path)
    state_file = path / STATE_FILE
    try:
        state = torch.load(state_file, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise CheckpointError(f"resume: {state_file} cannot be loaded ({_first_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"resume: {state_file} is not a preftune training state")
    if kind == SHARDED:
        if optimizer is None:
            raise CheckpointError(f"resume: {path} is sharded; loading it needs the optimizer")
        try:
            load_sharded(path / DCP_DIR, model, optimizer)
        except BaseException as e:  # DCP wraps every rank's error in a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise CheckpointError(f"resume: {path / DCP_DIR} does not load into this model "
                                  f"({_dcp_error(e)})") from None
        return state
    _load_weights(path / WEIGHTS_FILE, model)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"resume: {state_file} does not match this model's optimizer "
                                  f"({_first_line(e)})") from None
    return state


def _load_weights(file: Path, model: torch.nn.Module) -> None:
    try:
        weights = load_file(file)
    except (OSError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"resume: {file} cannot be loaded ({_first_line(e)})") from None
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # a shape differs: name the first tensor
        found = re.search(r"size mismatch for [^\n]*", str(e))
        raise CheckpointError(f"resume: {file} does not match the model "
                              f"({found.group(0) if found else _first_line(e)})") from None
    # Only tied duplicates may be missing: they were stored once.
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.named_parameters()}
    tied |= {n for n, p in model.named_parameters() if not p.requires_grad}  # see _trained_weights
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"resume: {file} does not match the model "
                              f"(missing {sorted(set(missing) - tied)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")


def _dcp_error(error: BaseException) -> str:
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        error = first[0] if isinstance(first, tuple) else first
    return _first_line(error)


def disk_needed(model_dir: Path, run_dir: Path, *, keep: int, optimizer_states: int,
                lora_r: int | None = None, merged_export: bool = True,
                element_size: int = 4) -> int:
    """Bytes the run's checkpoints and export still need at their peak, estimated from the
    weight files in ``model_dir`` (bytes of checkpoints already in ``run_dir`` are deducted).

    A checkpoint holds the weights and ``optimizer_states`` copies of them (AdamW 2, RMSprop 1).
    During a save the ``keep`` kept checkpoints and the new one coexist; the export is written
    after the last save's prune, beside ``keep`` of them. LoRA checkpoints (and an adapter
    export) hold adapters only: rank r on a d-wide layer is about 2r/d of its weights, budgeted
    as 8r/hidden_size (float32 adapters over 16-bit weights; narrower key/value projections).
    ``element_size``: bytes per weight the run keeps and saves (4: float32 master weights, also
    under bf16 mixed precision; 2: pure bf16), against the weight files' own.
    """
    weights = sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin")
                  for f in model_dir.glob(pattern))
    full = weights * element_size / _file_element_size(model_dir)  # in the run's dtype
    trained = full if lora_r is None else weights * _adapter_fraction(model_dir, lora_r)
    one = trained * (1 + optimizer_states)
    export = full if merged_export else trained
    peak = max((keep + 1) * one, keep * one + export)
    root = run_dir / "checkpoints"
    existing = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.is_dir() \
        else 0
    return max(0, int(peak) - existing)


_ELEMENT_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def _file_element_size(model_dir: Path) -> int:
    """Bytes per element of the largest tensor in the first safetensors file (its header
    only; 4 when unknown: a .bin file or an unreadable header)."""
    files = sorted(model_dir.glob("*.safetensors"))
    try:
        with safe_open(files[0], framework="pt") as f:
            slices = [f.get_slice(name) for name in f.keys()]  # noqa: SIM118 (not iterable)
            largest = max(slices, key=lambda s: math.prod(s.get_shape()))
            return _ELEMENT_SIZES.get(largest.get_dtype(), 4)
    except (IndexError, OSError, ValueError, SafetensorError):
        return 4


def _adapter_fraction(model_dir: Path, rank: int) -> float:
    try:
        hidden = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))["hidden_size"]
        return min(1.0, 8 * rank / hidden) if isinstance(hidden, int) and hidden > 0 else 1.0
    except (OSError, ValueError, KeyError, TypeError):
        return 1.0


def remove_interrupted_writes(run_dir: Path) -> None:
    """Remove the half-written checkpoint folders a killed run left in ``run_dir`` (on resume,
    before the disk space check: they hold space and are never read)."""
    root = run_dir / "checkpoints"
    if root.is_dir():
        _remove_half_written(root)
