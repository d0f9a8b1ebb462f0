"""Exact fast paths for the DPO log-probs of a micro-batch (same result as ``concatenated_logps``).

Three techniques, each usable on its own (flags of :func:`pair_logps`):

* **chunked** -- run the decoder body only (final norm included), take the hidden state that
  predicts each *labelled* token, and compute ``log p(label)`` through the output layer in
  chunks of ``chunk_size`` tokens (float32 logsumexp) with an autograd Function that recomputes
  the chunk logits in backward. No ``[B, T, V]`` tensor exists, nothing ``[N, V]`` is saved for
  backward, and only one chunk's ``[chunk_size, V]`` logits (with their float32 copy when the
  model is in a lower precision) are alive at a time, in forward and in backward; the one
  exception is ``keep_activations``, which keeps chunk logits only in memory the step's
  gradients have not taken yet (:mod:`preftune.recompute`). Not for FSDP-sharded models (the
  body and head weight are used outside the root's forward).
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
micro-batch in one row: no padding, no [L, L] mask.

On the fast paths a plain trainable ``nn.Embedding`` is looked up by an autograd Function
whose backward adds the used rows into ``weight.grad`` in place (:class:`_LookupIntoGrad`): no
dense [V, H] lookup gradient is built next to the (tied head's or previous micro-batch's) one.

The layout techniques need a model whose attention takes a custom 4D mask and position ids as
given: transformers' Llama, Mistral, Qwen2, Qwen3 and GPT-2 with the ``sdpa`` or ``eager``
attention (``create_causal_mask`` returns a 4D mask as-is; ``sdpa`` gets a boolean mask, True =
attend, ``eager`` an additive float mask). A sliding window longer than every sequence is a
no-op and is accepted; a shorter one is not (the model would not apply it to a custom mask).
The chunked head needs a plain ``nn.Linear`` output layer and no logit soft-capping/scaling.
Anything else falls back (per technique) to the plain computation with one warning, so results
are always those of ``concatenated_logps`` up to float rounding. Exactness also assumes no
dropout (the training loop disables it).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import attention, recompute
from .attention import Segment
from .data.collate import collate_pairs
from .logprobs import IGNORE_INDEX, PairLogps, concatenated_logps

__all__ = [
    "FastpathFallbackWarning",
    "PackedLayout",
    "build_layout",
    "chunked_target_logps",
    "pair_logps",
    "supports_fastpath",
]

Examples = Sequence[Mapping[str, Sequence[int]]] | Mapping[str, Tensor]

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


def _is_fsdp(model: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _family_reason(model: nn.Module) -> str | None:
    from transformers import PreTrainedModel

    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        return f"{name} is not a transformers PreTrainedModel"
    if _is_fsdp(model):
        # The chunked head calls the body and reads the head weight outside the root module's
        # forward, where FSDP2 would not have gathered the sharded parameters.
        return f"{name} is FSDP-sharded"
    if name not in _FAMILIES or not type(model).__module__.startswith("transformers.models."):
        return f"unknown architecture {name}"
    if model.base_model is model:
        return f"{name} has no separate decoder body"
    return None


# The checks below assume _family_reason(model) passed; both callers check it first.


def _chunk_reason(model: nn.Module) -> str | None:
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return f"output layer is {type(head).__name__}, not a plain nn.Linear"
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
        return f"sliding_window={window} is shorter than a sequence ({longest} tokens)"
    return None


def supports_fastpath(
    model: nn.Module, *, chunked: bool = True, share_prompt: bool = True, pack: bool = True
) -> bool | str:
    """True when every requested technique applies to ``model``, else the reason(s) why not.

    Data-dependent limits (a sliding window shorter than a sequence) are checked by
    :func:`pair_logps` per batch.
    """
    if (chunked or share_prompt or pack) and (r := _family_reason(model)):
        return r
    reasons = []
    if chunked and (r := _chunk_reason(model)):
        reasons.append(f"chunked: {r}")
    if (share_prompt or pack) and (r := _layout_reason(model)):
        reasons.append(f"share_prompt/pack: {r}")
    return "; ".join(reasons) if reasons else True


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


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class PackedLayout:
    """Rows to run through the model, and where each scored token's predictor sits in them.

    ``position_ids``/``segment_ids``/``branch_ids`` are None for the plain layout (one row per
    sequence, 2D ``padding_mask``). Otherwise ``segment_ids`` numbers the units (-1 on padding)
    and ``branch_ids`` is 0 on tokens every unit token may see (shared prefix, or a whole
    unshared sequence), 1 on a chosen tail and 2 on a rejected tail.
    """

    input_ids: Tensor  # [R, L]
    padding_mask: Tensor  # [R, L], 1 on real tokens
    position_ids: Tensor | None  # [R, L]
    segment_ids: Tensor | None  # [R, L]
    branch_ids: Tensor | None  # [R, L]
    source: Tensor  # [N] flat index into R * L of the position predicting each scored token
    targets: Tensor  # [N] the scored token ids
    sequence: Tensor  # [N] i for pair i's chosen, n_pairs + i for its rejected
    counts: Tensor  # [2 * n_pairs] scored tokens per sequence
    n_pairs: int
    # per row, (start, shared, chosen, rejected) of each unit (preftune.attention); None for
    # the plain layout
    segments: tuple[tuple[Segment, ...], ...] | None = None

    def attention_mask(self, implementation: str, dtype: torch.dtype) -> Tensor:
        """2D padding mask (plain layout), else the 4D mask [R, 1, L, L] for ``implementation``.

        ``sdpa`` gets a boolean mask (True = attend); ``eager`` an additive one (0 or the
        dtype's minimum). Padding queries attend only to themselves, which keeps them finite.
        """
        if self.segment_ids is None or self.branch_ids is None:
            return self.padding_mask
        seg, branch = self.segment_ids, self.branch_ids
        length = seg.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
        allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0) & causal
        allowed &= (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
        allowed |= torch.eye(length, dtype=torch.bool, device=seg.device)
        allowed = allowed[:, None]
        if implementation == "sdpa":
            return allowed
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


@dataclass
class _Unit:
    ids: list[int]
    positions: list[int]
    branch: list[int]
    pred: list[int]  # local index of the predicting position of each scored token
    targets: list[int]
    sequence: list[int]


def _as_examples(examples: Examples) -> list[dict[str, list[int]]]:
    """Tokenized examples as lists; a right-padded collated batch is un-padded."""
    if isinstance(examples, Mapping):
        out: list[dict[str, list[int]]] = [{} for _ in range(len(examples["chosen_input_ids"]))]
        for name in ("chosen", "rejected"):
            ids, mask = examples[f"{name}_input_ids"], examples[f"{name}_attention_mask"]
            labels = examples[f"{name}_labels"]
            for i, n in enumerate(mask.sum(-1).tolist()):
                if not bool(mask[i, :n].all()):
                    raise ValueError(f"{name} row {i} is not right-padded")
                out[i][f"{name}_input_ids"] = ids[i, :n].tolist()
                out[i][f"{name}_labels"] = labels[i, :n].tolist()
        return out
    return [
        {k: list(e[k]) for k in ("chosen_input_ids", "chosen_labels",
                                 "rejected_input_ids", "rejected_labels")}
        for e in examples
    ]


def _scored(labels: list[int], pred_of: Any, sequence: int, unit: _Unit) -> int:
    count = 0
    for t in range(1, len(labels)):
        if labels[t] != IGNORE_INDEX:
            unit.pred.append(pred_of(t - 1))
            unit.targets.append(labels[t])
            unit.sequence.append(sequence)
            count += 1
    return count


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _units(
    examples: list[dict[str, list[int]]], share_prompt: bool
) -> tuple[list[_Unit], list[int]]:
    b = len(examples)
    counts = [0] * (2 * b)
    units: list[_Unit] = []
    if share_prompt:
        for i, e in enumerate(examples):
            c, r = e["chosen_input_ids"], e["rejected_input_ids"]
            nc, nr = len(c), len(r)
            s = _common_prefix(c, r)
            u = _Unit(
                ids=c + r[s:],
                positions=list(range(nc)) + list(range(s, nr)),
                branch=[0] * s + [1] * (nc - s) + [2] * (nr - s),
                pred=[], targets=[], sequence=[],
            )
            counts[i] = _scored(e["chosen_labels"], lambda p: p, i, u)
            # a rejected position p >= s sits after the chosen tail: at nc + (p - s)
            counts[b + i] = _scored(
                e["rejected_labels"], lambda p, s=s, nc=nc: p if p < s else nc + p - s, b + i, u
            )
            units.append(u)
    else:  # all chosen, then all rejected: the row order of concatenated_logps
        for side, name in enumerate(("chosen", "rejected")):
            for i, e in enumerate(examples):
                ids = e[f"{name}_input_ids"]
                u = _Unit(ids=list(ids), positions=list(range(len(ids))), branch=[0] * len(ids),
                          pred=[], targets=[], sequence=[])
                counts[side * b + i] = _scored(e[f"{name}_labels"], lambda p: p, side * b + i, u)
                units.append(u)
    return units, counts


def _pack(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit decreasing: unit indices per row, each row's total length <= budget."""
    rows: list[list[int]] = []
    free: list[int] = []
    for u in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for r, room in enumerate(free):
            if lengths[u] <= room:
                rows[r].append(u)
                free[r] -= lengths[u]
                break
        else:
            rows.append([u])
            free.append(budget - lengths[u])
    return rows


def build_layout(
    examples: Examples,
    *,
    pad_token_id: int,
    share_prompt: bool = True,
    pack: bool = True,
    token_budget: int | None = None,
    device: torch.device | str | None = None,
) -> PackedLayout:
    """Lay a micro-batch out as model rows (see the module docstring for the techniques).

    ``token_budget`` caps a packed row's length; it is raised to the longest unit when
    smaller, and defaults to it. Without ``share_prompt`` and ``pack`` this is the plain
    layout of ``concatenated_logps`` (chosen rows then rejected rows, 2D padding mask).
    """
    rows_examples = _as_examples(examples)
    if not rows_examples:
        raise ValueError("cannot lay out an empty batch")
    n_pairs = len(rows_examples)
    units, counts = _units(rows_examples, share_prompt)
    lengths = [len(u.ids) for u in units]
    if pack:
        budget = max(max(lengths), token_budget or 0)
        rows = _pack(lengths, budget)
    else:
        rows = [[k] for k in range(len(units))]
    length = max(sum(lengths[k] for k in row) for row in rows)

    ids, pos, seg, branch, real = [], [], [], [], []
    segments: list[tuple[Segment, ...]] = []
    source: list[int] = []
    targets: list[int] = []
    sequence: list[int] = []
    for r, row in enumerate(rows):
        row_ids, row_pos, row_seg, row_branch = [], [], [], []
        row_segments = []
        for k in row:
            u = units[k]
            row_segments.append((len(row_ids), u.branch.count(0), u.branch.count(1),
                                 u.branch.count(2)))
            base = r * length + len(row_ids)
            source.extend(base + p for p in u.pred)
            targets.extend(u.targets)
            sequence.extend(u.sequence)
            row_ids += u.ids
            row_pos += u.positions
            row_seg += [k] * len(u.ids)
            row_branch += u.branch
        pad = length - len(row_ids)
        real.append([1] * len(row_ids) + [0] * pad)
        ids.append(row_ids + [pad_token_id] * pad)
        pos.append(row_pos + [0] * pad)
        seg.append(row_seg + [-1] * pad)
        branch.append(row_branch + [0] * pad)
        segments.append(tuple(row_segments))

    def t(x: list) -> Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    layout_4d = share_prompt or pack
    return PackedLayout(
        input_ids=t(ids),
        padding_mask=t(real),
        position_ids=t(pos) if layout_4d else None,
        segment_ids=t(seg) if layout_4d else None,
        branch_ids=t(branch) if layout_4d else None,
        source=t(source),
        targets=t(targets),
        sequence=t(sequence),
        counts=t(counts),
        n_pairs=n_pairs,
        segments=tuple(segments) if layout_4d else None,
    )


# ----------------------------------------------------------------------------- entry point


def _plain_batch(examples: Examples, pad_token_id: int) -> dict[str, Tensor]:
    if isinstance(examples, Mapping):
        return dict(examples)
    return collate_pairs(examples, pad_token_id)


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
    keep_activations: bool = True,
) -> PairLogps:
    """Chosen/rejected log-probs of a micro-batch, as ``concatenated_logps`` computes them.

    ``examples`` is a list of ``tokenize_pair`` outputs, or the right-padded batch of
    ``collate_pairs``. Pairs keep their input order. ``average`` gives the mean per scored
    token. ``segments``: with ``share_prompt`` or ``pack`` on an ``sdpa`` model, attend per
    pair segment (:mod:`preftune.attention`) instead of through a 4D mask; packing then puts
    the whole micro-batch in one row (no padding) unless ``token_budget`` is given.
    ``keep_activations`` (with ``chunked``): while the trainable parameters have no gradients
    yet (a step's first micro-batch), keep the output layer's chunk logits and then the last
    checkpointed blocks' activations for backward instead of recomputing them, up to the
    gradients' size (:mod:`preftune.recompute`). Techniques the model cannot use fall back to
    the plain path with one :class:`FastpathFallbackWarning`.
    """
    outer = model  # what the plain path calls: under FSDP only the root gathers parameters
    if hasattr(model, "get_base_model"):  # PEFT: the adapters live inside the model's layers
        model = model.get_base_model()
    reasons = []
    if (chunked or share_prompt or pack) and (r := _family_reason(model)):
        reasons.append(f"fast paths off ({r})")
        chunked = share_prompt = pack = False
    if chunked and (r := _chunk_reason(model)):
        reasons.append(f"chunked log-probs off ({r})")
        chunked = False
    if share_prompt or pack:
        r = _layout_reason(model)
        if r is None:
            lists = _as_examples(examples)
            longest = max(len(e[f"{s}_input_ids"]) for e in lists for s in ("chosen", "rejected"))
            r = _window_reason(model, longest)
            examples = lists
        if r:
            reasons.append(f"prompt sharing/packing off ({r})")
            share_prompt = pack = False
    if reasons:
        warnings.warn(f"preftune.fastpath: {'; '.join(reasons)}", FastpathFallbackWarning,
                      stacklevel=2)
    if not (chunked or share_prompt or pack):
        return concatenated_logps(outer, _plain_batch(examples, pad_token_id), average=average)

    embedding = model.get_input_embeddings()
    embed = embedding.weight
    impl = model.config._attn_implementation
    segmented = segments and (share_prompt or pack) and impl == "sdpa"
    if segmented and pack and token_budget is None:
        token_budget = sys.maxsize  # no cap: the micro-batch in one row
    layout = build_layout(examples, pad_token_id=pad_token_id, share_prompt=share_prompt,
                          pack=pack, token_budget=token_budget, device=embed.device)
    inputs: dict[str, Any] = {**_embed(embedding, layout.input_ids), "use_cache": False}
    plan = None
    if segmented:
        attention.install()
        plan = attention.Plan(layout.segments)
        # The 2D padding mask keeps transformers from building a 4D mask of its own (it would
        # go unused): all ones (one packed row) builds none.
        inputs.update({"attention_mask": layout.padding_mask, attention.PLAN_KEY: plan})
    else:
        inputs["attention_mask"] = layout.attention_mask(impl, embed.dtype)
    if layout.position_ids is not None:
        inputs["position_ids"] = layout.position_ids
    if chunked:
        head = model.get_output_embeddings()
        spare = recompute.spare_bytes(outer) if keep_activations and torch.is_grad_enabled() else 0
        # The output layer's backward runs first and allocates its weight's gradient while
        # everything kept is alive; then keep its logits first, then whole blocks.
        if head.weight.requires_grad and head.weight.grad is None:
            spare = max(0, spare - head.weight.numel() * head.weight.element_size())
        row = head.weight.shape[0] * torch.promote_types(head.weight.dtype, torch.float32).itemsize
        rows = layout.targets.numel()
        keep_rows = rows if rows * row <= spare else spare // row // chunk_size * chunk_size
        with recompute.keep_last_blocks(model, layout.input_ids.numel(), spare - keep_rows * row):
            hidden = model.base_model(**inputs).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, layout.source)
        token_logps = chunked_target_logps(hidden, head.weight, head.bias, layout.targets,
                                           chunk_size, keep_rows)
    else:
        logits = model(**inputs).logits
        vocab = logits.shape[-1]
        logits = logits.reshape(-1, vocab).to(torch.promote_types(logits.dtype, torch.float32))
        # As sequence_logps: logsumexp over every row, then pick; copying the scored rows out
        # of [R * L, V] first (index_select) is slower on CPU than the extra logsumexp rows.
        picked = logits.view(-1)[layout.source * vocab + layout.targets]
        token_logps = picked - torch.logsumexp(logits, dim=-1)[layout.source]
    if plan is not None and plan.calls == 0:  # the values would ignore the pair structure
        raise RuntimeError(f"preftune.fastpath: {type(model).__name__} did not pass the "
                           f"attention plan to its attention; set segments=False")
    n = layout.n_pairs
    totals = token_logps.new_zeros(2 * n).index_add(0, layout.sequence, token_logps)
    if average:
        totals = totals / layout.counts.clamp(min=1)
    return PairLogps(totals[:n], totals[n:], layout.counts[:n], layout.counts[n:])
