"""Exact fast paths for the DPO log-probs of a micro-batch (same result as ``concatenated_logps``).

Three techniques, each usable on its own (flags of :func:`pair_logps`):

* **chunked** -- run the decoder body only (final norm included), take the hidden state that
  predicts each *labelled* token, and compute ``log p(label)`` through the output layer in
  chunks of ``chunk_size`` tokens (float32 logsumexp) with an autograd Function that recomputes
  the chunk logits in backward. No ``[B, T, V]`` tensor exists, nothing ``[N, V]`` is saved for
  backward, and only one chunk's ``[chunk_size, V]`` logits (with their float32 copy when the
  model is in a lower precision) are alive at a time, in forward and in backward; the one
  exception is ``keep_activations``, which keeps chunk logits only in memory the step's
  gradients have not taken yet (:mod:`preftune.recompute`).
* **share_prompt** -- each pair is one sequence ``[shared prefix, chosen tail, rejected tail]``.
  The shared prefix is the longest common prefix of the chosen and rejected ids (the prompt, or
  more when both responses start alike), so it is computed once. Position ids restart the
  rejected tail at the prefix length, and a 4D mask keeps rejected tokens from seeing chosen
  ones, so every token sees exactly the context it has in a separate forward. Each scored token
  is predicted from its *predecessor* in its own sequence: the first rejected token from the
  last prefix position, not from the last chosen token.
* **pack** -- the units (pair sequences, or single chosen/rejected sequences without
  ``share_prompt``) are packed first-fit-decreasing into rows of at most ``token_budget`` tokens
  (default and minimum: the longest unit, so no row is longer than the plain batch's), with
  per-unit position ids and a block-diagonal 4D mask. Pad tokens are only the tail of each row,
  and there are fewer rows. Through the mask, attention costs ``rows * L^2`` (a dense masked
  kernel); the per-token work (projections, MLP, head) is done on (almost) real tokens only.

With either layout on an ``sdpa`` model, ``segments`` (default) replaces the 4D mask by two
causal attention calls per pair (:mod:`preftune.attention`), and packing then puts the whole
micro-batch in one row: no padding, no [L, L] mask. On CUDA, ``attention_kernel`` (``auto``)
makes that one FlexAttention call per layer with a block mask built once per micro-batch.

On the fast paths a plain trainable ``nn.Embedding`` is looked up by an autograd Function
whose backward adds the used rows into ``weight.grad`` in place (:class:`_LookupIntoGrad`): no
dense [V, H] lookup gradient is built next to the (tied head's or previous micro-batch's) one.

The layout techniques need a model whose attention takes a custom 4D mask and position ids as
given: transformers' Llama, Mistral, Qwen2, Qwen3 and GPT-2 with the ``sdpa`` or ``eager``
attention (``create_causal_mask`` returns a 4D mask as-is; ``sdpa`` gets a boolean mask, True =
attend, ``eager`` an additive float mask). A sliding window at least as long as every sequence
(``max_length``) is a no-op and is accepted; a shorter one is not (the model would not apply it
to a custom mask), even if most sequences are shorter. The chunked head needs a plain
``nn.Linear`` output layer and no logit soft-capping/scaling. Anything else falls back (per
technique) to the plain computation with one warning, so results are always those of
``concatenated_logps`` up to float rounding. Exactness also assumes no dropout (the training
loop disables it).

Under FSDP2 (:func:`preftune.distributed.shard`) the same code runs: the log-probs are
computed as the root module's forward and the chunked head as its output layer's (FSDP2's
hooks gather their parameters, again for backward, and reduce their gradients after), and the
embedding's in-place gradient goes to the gathered weight's gradient, which FSDP2 reduces.

All of this is decided once, at setup: :func:`decide_fast_paths` checks every model that runs
forwards on the run's batches and returns a frozen :class:`FastPaths`; its ``collate`` lays
micro-batches out on CPU (:func:`preftune.data.collate.collate_layout`), and
:func:`batch_logps` runs a laid-out micro-batch with no further check and no host sync.
:func:`pair_logps` does all three in one call, for tests and benchmarks.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import attention, recompute
from .data.collate import (
    Examples,
    PackedLayout,
    build_layout,
    collate_layout,
    collate_pairs,
    pair_lists,
)
from .logprobs import PairLogps, concatenated_logps

__all__ = [
    "FastPaths",
    "FastpathFallbackWarning",
    "PackedLayout",
    "batch_logps",
    "build_layout",
    "chunked_target_logps",
    "decide_fast_paths",
    "pair_logps",
    "supports_fastpath",
]

# Causal-LM classes whose forward is exactly ``lm_head(base_model(...).last_hidden_state)`` and
# whose attention honours a custom 4D mask plus position ids (checked against transformers 5).
_FAMILIES = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GPT2LMHeadModel",
}
_MASK_IMPLEMENTATIONS = ("sdpa", "eager")
# Config attributes of output-layer extras that a plain linear head does not reproduce.
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_mult")


class FastpathFallbackWarning(UserWarning):
    """A requested fast path is not available for this model; the plain path is used."""


# ----------------------------------------------------------------------------- support checks


def _model_class(model: nn.Module) -> type:
    """The class of ``model``, also once FSDP2 has sharded it (an instance of a subclass
    ``FSDP<name>`` made for it)."""
    cls = type(model)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
    return cls


def _family_reason(model: nn.Module) -> str | None:
    from transformers import PreTrainedModel

    cls = _model_class(model)
    name = cls.__name__
    if not isinstance(model, PreTrainedModel):
        return f"{name} is not a transformers PreTrainedModel"
    if name not in _FAMILIES or not cls.__module__.startswith("transformers.models."):
        return f"unknown architecture {name}"
    if model.base_model is model:
        return f"{name} has no separate decoder body"
    return None


# The checks below assume _family_reason(model) passed; both callers check it first.


def _chunk_reason(model: nn.Module) -> str | None:
    head = model.get_output_embeddings()
    if _model_class(head) is not nn.Linear:
        return f"output layer is {_model_class(head).__name__}, not a plain nn.Linear"
    for attr in _HEAD_EXTRAS:
        value = getattr(model.config, attr, None)
        if value is not None and value != 1:
            return f"config.{attr}={value} changes the logits"
    return None


def _layout_reason(model: nn.Module) -> str | None:
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in _MASK_IMPLEMENTATIONS:
        return f"attention implementation {impl!r} does not take a custom 4D mask"
    return None


def _window_reason(model: nn.Module, longest: int) -> str | None:
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    if window is not None and longest > window:
        return f"sliding_window={window} is shorter than a sequence may be ({longest} tokens)"
    return None


def supports_fastpath(
    model: nn.Module, *, chunked: bool = True, share_prompt: bool = True, pack: bool = True
) -> bool | str:
    """True when every requested technique applies to ``model``, else the reason(s) why not.

    The length-dependent limit (a sliding window shorter than a sequence) is checked by
    :func:`decide_fast_paths` against the longest sequence the run can have.
    """
    if (chunked or share_prompt or pack) and (r := _family_reason(model)):
        return r
    reasons = []
    if chunked and (r := _chunk_reason(model)):
        reasons.append(f"chunked: {r}")
    if (share_prompt or pack) and (r := _layout_reason(model)):
        reasons.append(f"share_prompt/pack: {r}")
    return "; ".join(reasons) if reasons else True


# ----------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class FastPaths:
    """Which exact fast paths run (the keywords of :func:`pair_logps`), and why requested ones
    do not (``fallbacks``, one reason each).

    A requested value comes from the settings; :func:`decide_fast_paths` turns it into the
    value a run uses, once, for its models. ``segments`` in a decided value means every model
    attends per pair segment (all use ``sdpa``); ``attention_kernel`` (requested: auto, segment
    or flex) is then ``flex`` (one FlexAttention call per layer, models on CUDA) or ``segment``.
    """

    pad_token_id: int
    chunked: bool = True
    chunk_size: int = 1024
    share_prompt: bool = True
    pack: bool = True
    token_budget: int | None = None
    segments: bool = True
    attention_kernel: str = "auto"
    keep_activations: bool = True
    fallbacks: tuple[str, ...] = ()

    @property
    def laid_out(self) -> bool:
        """Whether pairs are laid out (prompt sharing or packing) rather than one row each."""
        return self.share_prompt or self.pack

    @property
    def enabled(self) -> bool:
        """Whether any technique runs; else batches take the plain padded path."""
        return self.chunked or self.laid_out

    @property
    def row_budget(self) -> int | None:
        """The packed rows' token cap: with segment attention and no ``token_budget``, none
        (the micro-batch in one row: no padding, and no [L, L] mask to fear)."""
        if self.segments and self.pack and self.token_budget is None:
            return sys.maxsize
        return self.token_budget

    def flags(self) -> dict[str, Any]:
        """The keywords of :func:`pair_logps` that reproduce this value."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "fallbacks"}

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """A micro-batch of ``tokenize_pair`` outputs ready for :func:`batch_logps` under this
        (decided) value, on CPU: laid out when any technique runs, else padded."""
        if not self.enabled:
            return collate_pairs(examples, self.pad_token_id)
        return collate_layout(examples, self.pad_token_id, share_prompt=self.share_prompt,
                              pack=self.pack, token_budget=self.row_budget)


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (its adapters live in the layers)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decide_fast_paths(
    requested: FastPaths | None, models: Iterable[nn.Module | None], max_length: int
) -> FastPaths | None:
    """The fast paths a run uses: ``requested`` less what one of ``models`` cannot run.

    ``models`` are every model that runs forwards on the run's micro-batches (the policy,
    possibly PEFT-wrapped or FSDP-sharded, and a live reference model; None entries are
    skipped), whose sequences have at most ``max_length`` tokens. The batches are laid out
    once for all of them, so a technique one model cannot use is off for all. Requested
    techniques that are off are listed in ``fallbacks`` and in one
    :class:`FastpathFallbackWarning`. None when nothing was requested.
    """
    if requested is None:
        return None
    chunked, layout = requested.chunked, requested.laid_out
    reasons: list[str] = []
    implementations, devices = set(), set()
    for model in {id(m): _unwrap(m) for m in models if m is not None}.values():
        found = []
        if (chunked or layout) and (r := _family_reason(model)):
            found.append(f"fast paths off ({r})")
            chunked = layout = False
        if chunked and (r := _chunk_reason(model)):
            found.append(f"chunked log-probs off ({r})")
            chunked = False
        if layout and (r := _layout_reason(model) or _window_reason(model, max_length)):
            found.append(f"prompt sharing/packing off ({r})")
            layout = False
        if layout:
            implementations.add(model.config._attn_implementation)
            devices.add(model.get_input_embeddings().weight.device)
        reasons += [r for r in found if r not in reasons]
    segments = requested.segments and layout and implementations == {"sdpa"}
    kernel, why = (attention.choose_kernel(requested.attention_kernel, devices) if segments
                   else ("segment", None))
    reasons += [why] if why else []
    if segments:
        attention.install()
    if reasons:
        # Reported from here: the same reasons found again (say, for the reference before
        # the policy) print once.
        warnings.warn(f"preftune.fastpath: {'; '.join(reasons)}", FastpathFallbackWarning,
                      stacklevel=1)
    return dataclasses.replace(
        requested, chunked=chunked, share_prompt=requested.share_prompt and layout,
        pack=requested.pack and layout, segments=segments, attention_kernel=kernel,
        fallbacks=tuple(reasons))


# ----------------------------------------------------------------------------- chunked head


class _ChunkedTargetLogp(torch.autograd.Function):
    """log softmax(hidden @ W.T + b)[target] per row, chunk by chunk; logits recomputed in backward.

    Saved for backward: hidden [N, H], weight, bias, targets [N] and logsumexp [N], and the
    float32 logits of the chunks within the first ``keep_rows`` rows (backward turns them into
    their gradient in place instead of recomputing them); no other logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, keep_rows):  # noqa: ANN001
        device = hidden.device.type
        # backward recomputes the logits under the same autocast state as forward
        ctx.autocast = (device, torch.is_autocast_enabled(device),
                        torch.get_autocast_dtype(device))
        acc = torch.promote_types(hidden.dtype, torch.float32)
        n = hidden.shape[0]
        out = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        kept = []
        keep_rows = keep_rows if any(ctx.needs_input_grad[:3]) else 0  # no backward: keep none
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = F.linear(hidden[start:end], weight, bias).to(acc)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, targets[start:end, None]).squeeze(-1)
            out[start:end] = picked - lse[start:end]
            if end <= keep_rows:
                kept.append(logits)
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse, *kept)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return _ChunkedTargetLogp._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):  # noqa: ANN001
        # Kept logits are overwritten in place below: a second backward through this graph
        # fails on their version counter instead of reading gradients as logits.
        hidden, weight, bias, targets, lse, *kept = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = lse.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        chunk = ctx.chunk_size
        for i, start in enumerate(range(0, hidden.shape[0], chunk)):
            end = min(start + chunk, hidden.shape[0])
            h = hidden[start:end]
            g = grad_out[start:end].to(acc)[:, None]
            # d logp[target] / d logits = onehot(target) - softmax(logits)
            dlogits = kept[i] if i < len(kept) else F.linear(h, weight, bias).to(acc)
            dlogits.sub_(lse[start:end, None]).exp_().mul_(-g)
            dlogits.scatter_add_(1, targets[start:end, None], g)
            if need_b:
                grad_b += dlogits.sum(0)
            d = dlogits.to(weight.dtype)
            del dlogits
            if need_h:
                grad_h[start:end] = d @ weight
            if need_w and d.dtype == h.dtype == acc:
                grad_w.addmm_(d.t(), h)  # in place: no [V, H] temporary per chunk
            elif need_w:
                grad_w += d.t() @ h
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


class _LookupIntoGrad(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose backward adds the looked-up rows into ``weight.grad``.

    Through autograd the lookup's weight gradient is a dense [V, H] tensor that is then added to
    the gradient already there (the tied output head's, or an earlier micro-batch's): one more
    vocabulary-sized buffer alive at the end of every backward, when all gradients are. Here only
    the used rows are added, in place (as Megatron-LM accumulates weight gradients in backward).
    Same sum up to float addition order; the padding row gets no gradient, as in ``nn.Embedding``.
    """

    @staticmethod
    def forward(ctx, anchor, holder, ids, padding_idx):  # noqa: ANN001
        # The weight comes inside a list, so autograd draws no edge to it: an edge would hold
        # the weight's gradient accumulation back until this (last) backward had run.
        # ``anchor`` (empty, requires grad) makes the output differentiable.
        (weight,) = holder
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        return F.embedding(ids, weight.detach(), padding_idx)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        ids = ids.reshape(-1)
        rows = grad_out.reshape(ids.shape[0], -1).to(weight.dtype)
        if ctx.padding_idx is not None:
            keep = ids != ctx.padding_idx
            ids, rows = ids[keep], rows[keep]
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, ids, rows)
        return None, None, None, None


def _embed(emb: nn.Module, input_ids: Tensor) -> dict[str, Tensor]:
    """The model inputs for ``input_ids``: embedded by :class:`_LookupIntoGrad` when the input
    embedding ``emb`` is a plain trainable ``nn.Embedding`` and a backward will follow, else
    the ids."""
    w = emb.weight
    if (type(emb) is nn.Embedding and emb.max_norm is None and not emb.scale_grad_by_freq
            and not emb.sparse and w.is_leaf and w.requires_grad and torch.is_grad_enabled()):
        anchor = torch.empty(0, device=w.device, requires_grad=True)
        return {"inputs_embeds": _LookupIntoGrad.apply(anchor, [w], input_ids, emb.padding_idx)}
    return {"input_ids": input_ids}


def chunked_target_logps(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    chunk_size: int = 1024,
    keep_rows: int = 0,
) -> Tensor:
    """``log_softmax(hidden @ weight.T + bias)[i, targets[i]]`` for hidden [N, H] -> [N].

    Computed ``chunk_size`` rows at a time in float32 (float64 stays float64); backward
    recomputes each chunk's logits, so memory holds at most one [chunk_size, V] block, except
    the chunks within the first ``keep_rows`` rows: their logits are kept from forward to
    backward (same values, no recompute).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedTargetLogp.apply(hidden, weight, bias, targets, chunk_size, keep_rows)


# ----------------------------------------------------------------------------- entry points


def _ld_weights(layout: PackedLayout, alpha: float) -> Tensor:
    """LD-DPO's weight of each scored token of a layout (see ``logprobs.ld_token_weights``):
    ``alpha`` beyond the first min(|y_w|, |y_l|) tokens of its sequence. A sequence's tokens
    are listed in order, so a token's rank in its sequence comes from a stable sort."""
    sequence, counts, n = layout.sequence, layout.counts, layout.n_pairs
    order = torch.argsort(sequence, stable=True)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(sequence)
    rank[order] = torch.arange(len(sequence), device=sequence.device) - starts[sequence[order]]
    shared = torch.minimum(counts[:n], counts[n:]).repeat(2)
    ones = torch.ones((), dtype=torch.float32, device=sequence.device)
    return torch.where(rank >= shared[sequence], ones * alpha, ones)


def _layout_logps(
    model: nn.Module, layout: PackedLayout, fast: FastPaths, average: bool,
    ld_alpha: float | None = None,
) -> PairLogps:
    """Log-probs of a laid-out micro-batch (tensors on the model's device) under ``fast``,
    decided for ``model``: no capability check, no host sync."""
    plan = None
    if fast.segments and layout.segments is not None:
        attention.install()  # done at the decision; cached, for values built by hand
        mask = (attention.block_mask(layout.segment_ids, layout.branch_ids)
                if fast.attention_kernel == "flex" else None)  # once for every layer
        plan = attention.Plan(layout.segments, mask)
    # Run as ``model``'s forward: under FSDP2 its root parameters (embeddings, final norm, a
    # tied output layer) are gathered for the body called here and again for backward.
    token_logps = _as_forward(model, lambda: _token_logps(model, layout, fast, plan))
    if plan is not None and plan.calls == 0:  # the values would ignore the pair structure
        name = _model_class(_unwrap(model)).__name__
        raise RuntimeError(f"preftune.fastpath: {name} did not pass the attention plan to its "
                           f"attention; set segments=False")
    n = layout.n_pairs
    if ld_alpha is not None:
        token_logps = token_logps * _ld_weights(layout, ld_alpha)
    totals = token_logps.new_zeros(2 * n).index_add(0, layout.sequence, token_logps)
    if average:
        totals = totals / layout.counts.clamp(min=1)
    return PairLogps(totals[:n], totals[n:], layout.counts[:n], layout.counts[n:])


def _token_logps(outer: nn.Module, layout: PackedLayout, fast: FastPaths,
                 plan: attention.Plan | None) -> Tensor:
    """The log-prob of each scored token of ``layout`` (``layout.targets``) under ``outer``."""
    model = _unwrap(outer)
    embedding = model.get_input_embeddings()
    inputs: dict[str, Any] = {**_embed(embedding, layout.input_ids), "use_cache": False}
    if plan is not None:
        # The 2D padding mask keeps transformers from building a 4D mask of its own (it would
        # go unused): all ones (one packed row) builds none.
        inputs.update({"attention_mask": layout.padding_mask, attention.PLAN_KEY: plan})
    else:
        impl = model.config._attn_implementation
        inputs["attention_mask"] = layout.attention_mask(impl, embedding.weight.dtype)
    if layout.position_ids is not None:
        inputs["position_ids"] = layout.position_ids
    if fast.chunked:
        return _chunked_logps(outer, model, inputs, layout, fast)
    logits = model(**inputs).logits
    vocab = logits.shape[-1]
    logits = logits.reshape(-1, vocab).to(torch.promote_types(logits.dtype, torch.float32))
    # As sequence_logps: logsumexp over every row, then pick; copying the scored rows out
    # of [R * L, V] first (index_select) is slower on CPU than the extra logsumexp rows.
    picked = logits.view(-1)[layout.source * vocab + layout.targets]
    return picked - torch.logsumexp(logits, dim=-1)[layout.source]


def _chunked_logps(outer: nn.Module, model: nn.Module, inputs: dict[str, Any],
                   layout: PackedLayout, fast: FastPaths) -> Tensor:
    """The scored tokens' log-probs through the decoder body and the chunked output layer.
    ``outer``: what the recompute budget counts (every trainable parameter)."""
    head = model.get_output_embeddings()
    chunk_size = fast.chunk_size
    keep = fast.keep_activations and torch.is_grad_enabled()
    spare = recompute.spare_bytes(outer) if keep else 0
    # The output layer's backward runs first and allocates its weight's whole gradient while
    # everything kept is alive (also under FSDP2, before reducing it); then keep its logits
    # first, then whole blocks. (Shapes and sizes of a sharded weight are the whole one's.)
    weight = head.weight
    if weight.requires_grad:
        spare = max(0, spare - weight.numel() * weight.element_size())
    row = weight.shape[0] * torch.promote_types(weight.dtype, torch.float32).itemsize
    rows = layout.targets.numel()
    keep_rows = rows if rows * row <= spare else spare // row // chunk_size * chunk_size
    with recompute.keep_last_blocks(model, layout.input_ids.numel(), spare - keep_rows * row):
        hidden = model.base_model(**inputs).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, layout.source)
    # An output layer sharded as its own unit is gathered by its hooks (and its gradient
    # reduced after its backward); a plain or tied one (the root's, gathered) runs as it is.
    return _as_forward(head, lambda h: chunked_target_logps(h, head.weight, head.bias,
                                                           layout.targets, chunk_size,
                                                           keep_rows), hidden)


_FORWARD = "_preftune_forward"


def _as_forward(module: nn.Module, fn: Callable[..., Tensor], *tensors: Tensor) -> Tensor:
    """``fn(*tensors)`` run as if it were ``module``'s forward: for an FSDP2 module, between
    its pre- and post-forward hooks (``register_fsdp_forward_method``), so that ``fn`` sees its
    parameters gathered, they are gathered again for backward, and their gradients are reduced
    after backward has gone through ``tensors``. Any other module: ``fn(*tensors)``."""
    if not torch.distributed.is_available():
        return fn(*tensors)
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if not isinstance(module, FSDPModule):
        return fn(*tensors)
    if _FORWARD not in vars(module):
        setattr(module, _FORWARD, lambda fn, *tensors: fn(*tensors))
        register_fsdp_forward_method(module, _FORWARD)
    return getattr(module, _FORWARD)(fn, *tensors)


def batch_logps(
    model: nn.Module, batch: Mapping[str, Any], fast: FastPaths | None, *, average: bool = False,
    ld_alpha: float | None = None,
) -> PairLogps:
    """Chosen/rejected log-probs of one micro-batch, as ``concatenated_logps`` computes them.

    ``batch`` comes from ``fast.collate`` (``fast`` decided for ``model``, tensors moved to
    its device): a laid-out batch runs as it is. A padded ``collate_pairs`` batch takes the
    plain path when ``fast`` is None or all off; otherwise it goes through :func:`pair_logps`,
    which decides and lays out for this one call. ``ld_alpha``: LD-DPO's weight of the tokens
    beyond the shorter response's length (None: off).
    """
    layout = batch.get("layout")
    if layout is not None:
        if fast is None:
            raise ValueError("a laid-out micro-batch needs the FastPaths it was collated with")
        return _layout_logps(model, layout, fast, average, ld_alpha)
    if fast is None or not fast.enabled:
        return concatenated_logps(model, batch, average=average, ld_alpha=ld_alpha)
    return pair_logps(model, batch, average=average, ld_alpha=ld_alpha, **fast.flags())


def pair_logps(
    model: nn.Module,
    examples: Examples,
    *,
    pad_token_id: int,
    average: bool = False,
    chunked: bool = True,
    chunk_size: int = 1024,
    share_prompt: bool = True,
    pack: bool = True,
    token_budget: int | None = None,
    segments: bool = True,
    attention_kernel: str = "auto",
    keep_activations: bool = True,
    ld_alpha: float | None = None,
) -> PairLogps:
    """Chosen/rejected log-probs of a micro-batch, as ``concatenated_logps`` computes them:
    decide the fast paths for ``model`` and these sequences, lay the batch out, run it (the
    training loop does the first two once per run and per micro-batch, see the module
    docstring).

    ``examples`` is a list of ``tokenize_pair`` outputs, or the right-padded batch of
    ``collate_pairs``. Pairs keep their input order. ``average`` gives the mean per scored
    token. ``segments``: with ``share_prompt`` or ``pack`` on an ``sdpa`` model, attend per
    pair segment (:mod:`preftune.attention`) instead of through a 4D mask; packing then puts
    the whole micro-batch in one row (no padding) unless ``token_budget`` is given.
    ``attention_kernel``: auto (flex on CUDA, else segment), segment or flex (one
    FlexAttention call per layer; CUDA only, elsewhere it falls back to segment).
    ``keep_activations`` (with ``chunked``): while the trainable parameters have no gradients
    yet (a step's first micro-batch), keep the output layer's chunk logits and then the last
    checkpointed blocks' activations for backward instead of recomputing them, up to the
    gradients' size (:mod:`preftune.recompute`). Techniques the model cannot use fall back to
    the plain path with one :class:`FastpathFallbackWarning`.
    """
    requested = FastPaths(pad_token_id=pad_token_id, chunked=chunked, chunk_size=chunk_size,
                          share_prompt=share_prompt, pack=pack, token_budget=token_budget,
                          segments=segments, attention_kernel=attention_kernel,
                          keep_activations=keep_activations)
    lists = pair_lists(examples) if requested.enabled else []
    longest = max((len(e[f"{s}_input_ids"]) for e in lists for s in ("chosen", "rejected")),
                  default=0)
    fast = decide_fast_paths(requested, [model], longest)
    if not fast.enabled:
        batch = examples if isinstance(examples, Mapping) else collate_pairs(examples,
                                                                               pad_token_id)
        return concatenated_logps(model, batch, average=average, ld_alpha=ld_alpha)
    device = _unwrap(model).get_input_embeddings().weight.device
    return _layout_logps(model, fast.collate(lists)["layout"].to(device), fast, average,
                         ld_alpha)
