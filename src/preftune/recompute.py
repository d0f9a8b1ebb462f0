"""What a forward keeps for backward instead of recomputing it, in memory the gradients have
not taken yet.

With activation checkpointing, a step's memory peaks at the end of its last backward, when
every parameter gradient exists. Before the step's first backward none does: from the start of
the forward to the early part of backward, memory up to the size of the missing gradients is
free. The output layer and the last decoder blocks run their backward first, so what they keep
there (instead of recomputing it) is released before the gradients pile up: the peak stays
where it was and the recompute is skipped. A kept activation is the tensor the recompute
would have produced, so values and gradients are unchanged.

:func:`spare_bytes` is that free memory; :func:`keep_last_blocks` lets the last checkpointed
blocks that fit in a budget run without checkpointing for one forward, costing each block by
the most a kept block has saved for backward per token so far (measured with saved-tensor
hooks; before the first measurement, a deliberately high estimate from the config).

Under FSDP2 the gradients that do not exist yet are this rank's shards; a block's or the output
layer's backward still allocates its whole (unsharded) gradient before reducing it, and the
costs count that.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from .distributed import transformer_blocks

__all__ = ["block_bytes_per_token", "keep_last_blocks", "spare_bytes"]

# Measured bytes one decoder block saves for backward per token, per model (the largest seen).
_MEASURED: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()


def spare_bytes(model: nn.Module) -> int:
    """Bytes of the trainable parameters' gradients that do not exist yet: the memory free
    until this step's backward allocates them (0 after a micro-batch's backward, when
    gradients accumulate). Under FSDP2, this rank's shards of them."""
    units = _fsdp_units(model)
    if not units:
        return sum(p.numel() * p.element_size() for p in model.parameters()
                   if p.requires_grad and p.grad is None)
    try:
        return _sharded_spare_bytes(units)
    except AttributeError:  # FSDP2's internals moved (another torch): count nothing as free
        return 0


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _sharded_spare_bytes(units: list[nn.Module]) -> int:
    """A sharded model's gradient lives on the sharded parameter, or, between reductions (no
    gradient sync), unsharded in FSDP2's record of the parameter; while a unit is gathered, its
    modules hold unsharded parameters with neither. FSDP2 has no public view of the records."""
    groups = {id(g): g for m in units for g in m._get_fsdp_state()._fsdp_param_groups}
    total = 0
    for record in (r for g in groups.values() for r in g.fsdp_params):
        p = record.sharded_param
        unsharded = getattr(record, "_unsharded_param", None)  # made at the first gather
        accumulating = record.unsharded_accumulated_grad is not None or (
            unsharded is not None and unsharded.grad is not None)
        if p.requires_grad and p.grad is None and not accumulating:
            total += p.to_local().numel() * p.element_size()
    return total


def block_bytes_per_token(model: nn.Module) -> float:
    """What one decoder block of ``model`` saves for backward per token without checkpointing:
    the largest value measured so far, else :func:`_estimate`."""
    return _MEASURED[model] if model in _MEASURED else _estimate(model)


def _estimate(model: nn.Module) -> float:
    """A block's saved bytes per token from the config, erring high: 36 x hidden + 4 x MLP
    size elements (measured on Llama, Qwen2, Qwen3 and GPT-2 blocks: 18-34 x hidden + 4 x
    MLP size)."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 4096
    mlp = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
           or 4 * hidden)
    return float(next(model.parameters()).element_size() * (36 * hidden + 4 * mlp))


@contextlib.contextmanager
def keep_last_blocks(model: nn.Module, tokens: int, budget: int) -> Iterator[int]:
    """Within the context, the last checkpointed decoder blocks of ``model`` whose saved
    activations for ``tokens`` tokens fit in ``budget`` bytes run without checkpointing (their
    backward reuses what forward saved). Yields how many. The last of them is measured (saved
    tensors, parameters excluded, each storage once) for later calls."""
    blocks = [b for b in transformer_blocks(model) if getattr(b, "gradient_checkpointing", False)]
    count = 0
    if blocks and tokens > 0 and budget > 0 and model.training and torch.is_grad_enabled():
        # A block's backward allocates its gradients while its activations are still alive.
        grads = sum(p.numel() * p.element_size() for p in blocks[-1].parameters()
                    if p.requires_grad)
        count = min(len(blocks), int(budget // (block_bytes_per_token(model) * tokens + grads)))
    kept = blocks[len(blocks) - count:] if count else []
    measure = _Measure(model, kept[-1], tokens) if kept else contextlib.nullcontext()
    for block in kept:
        block.gradient_checkpointing = False
    try:
        with measure:
            yield count
    finally:
        for block in kept:
            block.gradient_checkpointing = True


class _Measure:
    """Sum the storages one block saves for backward during its forward (forward hooks enter
    and leave a saved-tensor hooks context around it)."""

    def __init__(self, model: nn.Module, block: nn.Module, tokens: int) -> None:
        self.model, self.block, self.tokens = model, block, tokens
        self.params: set[int] = set()
        self.storages: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.active = False

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def _enter(self, *_: object) -> None:
        # Read here, after FSDP2's pre-forward hook (which runs first) has put the gathered
        # parameters in place of the shards.
        self.params = {p.untyped_storage().data_ptr() for p in self.block.parameters()}
        self.hooks.__enter__()
        self.active = True

    def _leave(self, *_: object) -> None:
        if self.active:
            self.hooks.__exit__(None, None, None)
            self.active = False

    def __enter__(self) -> _Measure:
        self.handles = [self.block.register_forward_pre_hook(self._enter),
                        self.block.register_forward_hook(self._leave)]
        return self

    def __exit__(self, *exc: object) -> None:
        self._leave()  # the block raised inside its forward
        for handle in self.handles:
            handle.remove()
        if self.storages:
            per_token = sum(self.storages.values()) / self.tokens
            _MEASURED[self.model] = max(per_token, _MEASURED.get(self.model, 0.0))
