"""What ``dtype`` and ``master_weights`` mean for the models of a run, on 1 or N processes.

``dtype=bfloat16`` (with the default ``master_weights=float32``) is mixed precision: the
optimizer updates float32 weights with float32 gradients and state, while forwards and
backwards run their matmuls in bfloat16. On one process that is ``torch.autocast``; under
torchrun FSDP2 keeps the float32 weights sharded and gathers bf16 copies of them for compute
(``MixedPrecisionPolicy``, ``distributed.shard``), the forwards also run under autocast, and
gradients are reduced in ``reduce_dtype`` (float32 by default). bf16 keeps 8 significant bits:
an update smaller than about 2^-8 x |w| rounds away in a bf16 weight, and DPO learning rates
(5e-7; Adam and RMSprop updates are about lr in size) sit far below that for typical weights
(|w| ~ 0.02: 2^-8 x 0.02 = 8e-5). ``master_weights=bfloat16`` keeps the weights themselves in
bf16 (pure bf16, as the run computes) and warns when lr is below that threshold.

Every model of a run computes the same way, so that at step 0 the policy's log-probs are the
reference's and the DPO loss is ln 2: a live reference is loaded (and sharded) like the
policy, and the precomputed reference pass, which under torchrun runs on an unsharded copy,
there uses bf16 copies of the weights as FSDP2 does (``parameters_in``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .config import TrainConfig
from .tracking import warn

# bf16 has 8 significant bits: a weight w moves only by steps of at least 2^-8 x |w| or so.
BF16_RESOLUTION = 2.0 ** -8


def mixed(cfg: TrainConfig) -> bool:
    """Whether the run computes in bf16 from float32 master weights."""
    return cfg.dtype == "bfloat16" and cfg.master_weights == "float32"


def weights_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype models are loaded and kept in: bf16 only for pure bf16 (master_weights)."""
    return torch.bfloat16 if cfg.dtype == "bfloat16" and not mixed(cfg) else torch.float32


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The context every forward of the run's models runs in: bf16 autocast when mixed."""
    if not mixed(cfg):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def fsdp_dtypes(cfg: TrainConfig) -> dict[str, torch.dtype | None]:
    """``distributed.shard``'s ``param_dtype`` (what FSDP2 gathers the weights in for
    compute; None: as stored) and ``reduce_dtype`` (what gradients are reduced in)."""
    return {"param_dtype": torch.bfloat16 if mixed(cfg) else None,
            "reduce_dtype": torch.bfloat16 if cfg.reduce_dtype == "bfloat16" else torch.float32}


@contextlib.contextmanager
def parameters_in(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Within the block (no gradients: forwards only), ``model``'s floating-point parameters
    hold ``dtype`` copies of their values, as FSDP2 computes with ``param_dtype``; restored
    exactly after it. None: left as they are."""
    saved = [(p, p.data) for p in model.parameters()
             if dtype is not None and p.is_floating_point() and p.dtype != dtype]
    try:
        for p, data in saved:
            p.data = data.to(dtype)
        yield
    finally:
        for p, data in saved:
            p.data = data


def mean_magnitude(model: torch.nn.Module, dtype: torch.dtype) -> float | None:
    """The mean |w| over the elements of the trainable ``dtype`` parameters (None: none)."""
    params = [p for p in model.parameters() if p.requires_grad and p.dtype == dtype]
    count = sum(p.numel() for p in params)
    if not count:
        return None
    total = sum(float(torch.linalg.vector_norm(p.detach(), 1, dtype=torch.float32))
                for p in params)
    return total / count


def check_learning_rate(cfg: TrainConfig, model: torch.nn.Module, *, show: bool = True) -> bool:
    """With pure bf16 weights, warn (one line on stderr) when ``lr`` is below
    ``BF16_RESOLUTION`` x the mean |w| of the trainable bf16 weights: most updates would
    round away. Returns whether it is."""
    if weights_dtype(cfg) != torch.bfloat16:
        return False
    magnitude = mean_magnitude(model, torch.bfloat16)
    if magnitude is None or cfg.lr >= BF16_RESOLUTION * magnitude:
        return False
    if show:
        warn(f"master_weights=bfloat16: lr {cfg.lr:g} is below 2^-8 x the mean |weight| "
             f"({BF16_RESOLUTION * magnitude:.2g}): most updates round away in bf16 weights; "
             "master_weights=float32 keeps them")
    return True
