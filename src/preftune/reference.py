"""The frozen reference a preference objective compares the policy with: one interface.

``Reference.logps(batch)`` gives the reference's chosen and rejected log-probs of a micro-batch
(None when the objective has no reference) and ``Reference.sample(generate)`` its completions
of the held-out prompts, taken once since the reference never changes. Four kinds, chosen once
in setup (``preftune.train.build_models``): log-probs precomputed before training and
carried by the pairs, the policy with its LoRA adapters bypassed, a separate frozen model, or
none (reference-free losses, SimPO).

Precomputing: the reference is frozen, so its log-probs of each pair never change during
training: one batched no-grad pass before training replaces a reference forward at every
step, and the reference model can be freed. The on-disk cache key covers everything the
numbers depend on: the reference weights, the exact token ids and labels of every pair (hence
the tokenizer, the data and the truncation settings), the length normalisation, the dtype of
the weights and the precision they compute in (``preftune.precision``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .distributed import World, share
from .io import atomic_write
from .logprobs import PairLogps, concatenated_logps
from .lora import reference_view
from .tracking import warn

Example = dict[str, list[int]]
KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
CARRIED = ("reference_chosen_logps", "reference_rejected_logps")  # what attach adds
Logps = Callable[[torch.nn.Module, dict], PairLogps]  # a batch's log-probs under a model
Generate = Callable[[torch.nn.Module], list[str]]  # a model's completions of fixed prompts


class Reference(Protocol):
    def logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The reference's chosen and rejected log-probs of ``batch`` (no gradients), or None
        for no reference."""
        ...

    def sample(self, generate: Generate) -> list[str] | None:
        """The reference's completions (``generate`` applied to it), or None."""
        ...


class NoReference:
    """Reference-free objectives: no model, no numbers; rewards are measured against 0."""

    def logps(self, batch: dict) -> None:
        return None

    def sample(self, generate: Generate) -> None:
        return None


class PrecomputedReference:
    """Log-probs computed once before training and carried by every pair (``attach``); the
    completions were taken then too, and the model freed."""

    def __init__(self, samples: list[str] | None) -> None:
        self.samples = samples

    def logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return batch[CARRIED[0]], batch[CARRIED[1]]

    def sample(self, generate: Generate) -> list[str] | None:
        return self.samples


class FrozenReference:
    """A frozen model run live on each micro-batch, with the objective's log-prob function."""

    def __init__(self, model: torch.nn.Module, logps: Logps) -> None:
        self.model, self._logps = model, logps
        self._samples: list[str] | None = None

    def _view(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @torch.no_grad()
    def logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        with self._view():
            out = self._logps(self.model, batch)
        return out.chosen, out.rejected

    def sample(self, generate: Generate) -> list[str]:
        if self._samples is None:  # sampled once, until the reference changes (TR-DPO)
            with self._view():
                self._samples = generate(self.model)
        return self._samples

    @torch.no_grad()
    def update_from(self, policy: torch.nn.Module, alpha: float) -> None:
        """TR-DPO, Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good
        Alignment" (arXiv:2404.09656), the soft update theta_ref <- alpha * theta +
        (1 - alpha) * theta_ref, parameter by parameter; alpha = 1 is the hard update (a copy).
        Both models hold the same parameters in the same order (sharded alike under FSDP2)."""
        from .distributed import reshard_all

        for model in (self.model, policy):  # FSDP2 keeps a root unit gathered after forward
            reshard_all(model)
        for ref, new in zip(self.model.parameters(), policy.parameters(), strict=True):
            if alpha == 1.0:
                ref.copy_(new)
            else:
                ref.lerp_(new.to(ref.dtype), alpha)
        self._samples = None

    def weights(self, world: World) -> dict[str, torch.Tensor]:
        """The reference's full weights on CPU, for checkpoints (call on every rank)."""
        if world.distributed:
            from .distributed import full_state_dict

            return full_state_dict(self.model, world)
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def load_weights(self, weights: dict[str, torch.Tensor], world: World) -> None:
        """Restore ``weights()`` output exactly."""
        if world.distributed:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            set_model_state_dict(self.model, weights,
                                 options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(weights)
        self._samples = None


class AdapterOffReference(FrozenReference):
    """LoRA: the policy itself with its adapters bypassed, so no second copy of the weights
    (PEFT starts the adapters at zero, so at step 0 it equals the policy)."""

    def _view(self) -> contextlib.AbstractContextManager:
        return reference_view(self.model)


def weights_digest(model: torch.nn.Module) -> bytes:
    """A digest of every named weight of ``model`` (names, dtypes and bytes)."""
    h = hashlib.blake2b(digest_size=20)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.digest()


def fingerprint(
    model: torch.nn.Module, examples: Sequence[Example], *, average: bool,
    weights: bytes | None = None, ld_alpha: float | None = None, precision: str = "",
) -> str:
    """A hex digest of the reference weights, the tokenized pairs and the settings.

    ``weights`` is ``weights_digest(model)`` when the caller already has it (the train and
    eval pairs of one run share it: hashing the weights once is most of the cost).
    ``precision`` names a compute precision other than the weights' own ("": theirs)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"average={average};n={len(examples)}".encode())
    if ld_alpha is not None:  # LD-DPO's token weighting changes the numbers
        h.update(f";ld_alpha={float(ld_alpha)!r}".encode())
    if precision:  # bf16 compute from float32 weights: other numbers, same weights
        h.update(f";precision={precision}".encode())
    h.update(weights if weights is not None else weights_digest(model))
    for ex in examples:
        for key in KEYS:
            h.update(key.encode())
            h.update(torch.tensor(ex[key], dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def compute_reference_logps(
    model: torch.nn.Module,
    examples: Sequence[Example],
    batches: Callable[[Sequence[Example]], object],
    *,
    logps: Callable[[torch.nn.Module, dict], PairLogps],
    world: World | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs of every example, in order (float32, on CPU).

    Under N processes each rank runs its strided share with its own unsharded copy of the
    reference (no collectives inside the forward), then the shares are summed into place."""
    world = world or World()
    mine = share(list(range(len(examples))), world)
    out = torch.zeros(2, len(examples), dtype=torch.float64)
    done = 0
    bar = tqdm(total=len(mine), desc="reference log-probs", unit="pair", leave=False,
               disable=not (world.main and sys.stderr.isatty()), file=sys.stderr)
    for batch in batches([examples[i] for i in mine]):
        pair = logps(model, batch)
        rows = mine[done : done + len(pair.chosen)]
        out[0, rows] = pair.chosen.double().cpu()
        out[1, rows] = pair.rejected.double().cpu()
        done += len(rows)
        bar.update(len(rows))
    bar.close()
    if world.distributed:
        torch.distributed.all_reduce(out)
    return out[0].float(), out[1].float()


def cached_reference_logps(
    model: torch.nn.Module,
    examples: Sequence[Example],
    batches: Callable[[Sequence[Example]], object],
    *,
    average: bool,
    cache_dir: Path,
    logps: Callable[[torch.nn.Module, dict], PairLogps] | None = None,
    world: World | None = None,
    weights: bytes | None = None,
    ld_alpha: float | None = None,
    precision: str = "",
) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
    """Reference log-probs from the cache, or computed and stored; returns (logps, hit).

    ``logps`` computes a batch's log-probs (default: the plain concatenated forward); any
    exact path gives the same numbers, so it is not part of the fingerprint. ``weights``:
    ``weights_digest(model)``, if already computed. ``ld_alpha``: the LD-DPO weighting the
    numbers carry (part of the key). ``precision``: how the model computes when not in its
    weights' dtype (part of the key; see ``fingerprint``)."""
    world = world or World()
    key = fingerprint(model, examples, average=average, weights=weights, ld_alpha=ld_alpha,
                      precision=precision)
    path = cache_dir / f"{key}.safetensors"
    cached, problem = _read_entry(path, len(examples)) if path.is_file() else (None, "")
    hit = cached is not None
    if world.distributed:  # every rank must take the same branch
        flag = torch.tensor([int(hit)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        hit = bool(flag.item())
    if hit:
        return cached, True  # type: ignore[return-value]
    if problem and world.main:
        warn(f"{path}: damaged reference log-prob cache entry ({problem}); recomputing it")
    if logps is None:
        def logps(m, batch):
            return concatenated_logps(m, batch, average=average, ld_alpha=ld_alpha)
    chosen, rejected = compute_reference_logps(model, examples, batches, logps=logps,
                                               world=world)
    if world.main:
        _write_entry(path, chosen, rejected)
    return (chosen, rejected), False


def _read_entry(path: Path, n: int) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, str]:
    """(chosen, rejected) of a cache entry, or None and what is wrong with it."""
    try:
        entry = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        return None, f"unreadable: {' '.join(str(e).split())[:120]}"
    if set(entry) != {"chosen", "rejected"}:
        return None, f"tensors {sorted(entry)[:4]}, expected chosen and rejected"
    for name, tensor in entry.items():
        if tensor.shape != (n,) or tensor.dtype != torch.float32:
            return None, f"{name} is {tensor.dtype} {list(tensor.shape)}, expected float32 [{n}]"
    return (entry["chosen"], entry["rejected"]), ""


def _write_entry(path: Path, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Store an entry atomically and durably (file and folder synced before and after the
    rename), so that a crash or power loss leaves the old state or the whole new entry. A
    cache that cannot be written costs only its reuse: one warning, and training goes on."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file({"chosen": chosen, "rejected": rejected}, tmp),
                     tmp=path.with_name(f".{path.name}.{os.getpid()}.tmp"))
    except OSError as e:
        warn(f"cannot write the reference log-prob cache in {path.parent} "
              f"({e.strerror or e}); training goes on without it")


def attach(examples: Sequence[Example], logps: tuple[torch.Tensor, torch.Tensor]) -> list[dict]:
    """Copies of ``examples`` carrying their reference log-probs, for ``collate_pairs``."""
    chosen, rejected = logps
    return [{**ex, "reference_chosen_logps": float(c), "reference_rejected_logps": float(r)}
            for ex, c, r in zip(examples, chosen.tolist(), rejected.tolist(), strict=True)]
