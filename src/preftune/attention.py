"""Attention over the pair layout, one pair segment at a time.

The fast-path layout (:mod:`preftune.fastpath`) runs each pair as one sequence ``[shared
prefix, chosen tail, rejected tail]``. With a 4D mask, one attention call covers the whole row,
and a dense kernel computes every query-key block, visible or not. Here the same attention is
two causal calls per pair instead:

* prefix + chosen tail: ordinary causal attention over that span;
* rejected tail: its queries against the keys ``[shared prefix, rejected tail]``, causal with
  the diagonal aligned to the bottom right, so the tail sees the whole prefix and its own past
  (a [rejected, prefix + rejected] mask).

An unshared sequence (``share_prompt`` off) is one causal call. No [L, L] mask is built for
the row, and on GPUs the causal calls can run flash kernels. Each query attends to exactly the
keys the 4D mask allows, so results equal the masked call up to float summation order;
padding queries (the tail of a row) get zeros.

The plan travels to the attention function as the keyword argument ``preftune_plan`` of the
decoder body's forward: transformers passes such keywords down to every attention call, and
activation checkpointing replays them in the recompute. :func:`install` wraps the ``sdpa``
entry of transformers' attention registry so that a call carrying a plan takes this path and
every other call is untouched.

On CUDA, ``attention_kernel=flex`` (the default there, through ``auto``) replaces the Python
loop over pairs by one FlexAttention call per layer for the whole micro-batch: the plan then
also carries a :func:`block_mask` built once per micro-batch from the layout's segment and
branch ids, so every layer (and the checkpointed recompute) reuses it. The block mask skips
the blocks no query sees (other pairs, a rejected tail against the chosen one), so packing the
micro-batch into one long row costs no [L, L] work. FlexAttention has no backward on CPU, so
the segment calls stay the CPU path.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

__all__ = ["KERNELS", "PLAN_KEY", "Plan", "Segment", "block_mask", "choose_kernel", "install",
           "segment_attention"]

PLAN_KEY = "preftune_plan"
KERNELS = ("auto", "segment", "flex")

# (start, shared, chosen, rejected): a unit's first position in its row and the lengths of its
# shared prefix, chosen tail and rejected tail (an unshared sequence: (start, length, 0, 0)).
Segment = tuple[int, int, int, int]


class _Count:
    n = 0


@dataclass(eq=False)
class Plan:
    """The segments of each row of a layout, and how many attention calls have used them
    (zero after a forward means the model did not route its attention through here). With a
    ``block_mask`` (:func:`block_mask` of the same layout), calls run FlexAttention."""

    rows: tuple[tuple[Segment, ...], ...]
    block_mask: BlockMask | None = None
    # Not an int: FSDP2's mixed-precision input cast rebuilds a dataclass argument for each
    # block it enters; its copies share this object, so their calls count here.
    count: _Count = field(default_factory=_Count)

    @property
    def calls(self) -> int:
        return self.count.n


def segment_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    rows: Sequence[Sequence[Segment]],
    *,
    scale: float | None = None,
    dropout: float = 0.0,
    gqa: bool = False,
) -> Tensor:
    """Attention of ``query`` [R, H, L, D] over ``key``/``value`` [R, H, L, D] (heads already
    repeated for grouped queries; with ``gqa``, [R, H / G, L, D] and SDPA's ``enable_gqa``),
    per segment of ``rows`` (one list of segments per row). Returns [R, H, L, D]; positions
    after a row's last segment are zeros."""
    length = query.shape[2]
    # Cut each row into its segments' pieces with one split per tensor: the backward of a split
    # is one concatenation, where slicing a row per call costs a zero-filled row-sized gradient
    # per slice (and an addition to gather them).
    split = (lambda t: [t]) if query.shape[0] == 1 else (lambda t: t.split(1))
    outs = []
    for q, k, v, segments in zip(split(query), split(key), split(value), rows, strict=True):
        sizes, end = [], 0
        for start, shared, chosen, rejected in segments:
            if start != end:
                raise ValueError(f"segments must tile their row: one starts at {start}, not {end}")
            sizes += [shared + chosen, rejected]
            end = start + shared + chosen + rejected
        sizes.append(length - end)
        qs, ks, vs = q.split(sizes, dim=2), k.split(sizes, dim=2), v.split(sizes, dim=2)
        parts = []
        for i, (_, shared, _, rejected) in enumerate(segments):
            head, tail = 2 * i, 2 * i + 1
            parts.append(F.scaled_dot_product_attention(
                qs[head], ks[head], vs[head], dropout_p=dropout, is_causal=True, scale=scale,
                enable_gqa=gqa))
            if rejected:
                keys = torch.cat([ks[head][:, :, :shared], ks[tail]], dim=2)
                values = torch.cat([vs[head][:, :, :shared], vs[tail]], dim=2)
                # causal, diagonal at the bottom right: the whole prefix, then its own past
                sees = torch.ones(rejected, shared + rejected, dtype=torch.bool,
                                  device=q.device).tril(diagonal=shared)
                parts.append(F.scaled_dot_product_attention(
                    qs[tail], keys, values, attn_mask=sees, dropout_p=dropout, scale=scale,
                    enable_gqa=gqa))
        if end < length:
            parts.append(q.new_zeros(*q.shape[:2], length - end, q.shape[3]))
        outs.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]


def choose_kernel(requested: str, devices: Iterable[torch.device]) -> tuple[str, str | None]:
    """The kernel segment attention runs with for models on ``devices``, and why a requested
    ``flex`` is off (None when it is not): ``flex`` when requested or ``auto`` and every
    model is on CUDA, else ``segment`` (FlexAttention has no backward on CPU)."""
    if requested not in KERNELS:
        raise ValueError(f"attention_kernel: expected one of {', '.join(KERNELS)}, got "
                         f"{requested!r}")
    kinds = {torch.device(d).type for d in devices}
    if kinds == {"cuda"} and requested != "segment":
        return "flex", None
    if requested == "flex":
        return "segment", (f"flex attention off (models on {', '.join(sorted(kinds))}: "
                           "FlexAttention trains on CUDA only)")
    return "segment", None


def block_mask(segment_ids: Tensor, branch_ids: Tensor, block_size: int = 128) -> BlockMask:
    """FlexAttention's mask for a layout's rows, from its ``segment_ids``/``branch_ids``
    [R, L] (:class:`preftune.data.collate.PackedLayout`): a query sees the keys of its own
    unit, causally, except a chosen tail's from a rejected one (and the reverse); padding
    (segment -1) sees and is seen by nothing, so its outputs are zeros as on the segment path.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        seg_q, seg_kv = segment_ids[b, q], segment_ids[b, kv]
        branch_q, branch_kv = branch_ids[b, q], branch_ids[b, kv]
        return ((seg_q == seg_kv) & (seg_kv >= 0) & (q >= kv)
                & ((branch_kv == 0) | (branch_q == branch_kv)))

    rows, length = segment_ids.shape
    # Compiled on CUDA: eager evaluation materialises [R, L, L] index tensors, gigabytes for
    # a micro-batch packed into one row of tens of thousands of tokens.
    create = _compiled(create_block_mask, None) if segment_ids.is_cuda else create_block_mask
    return create(mask_mod, rows, None, length, length, device=segment_ids.device,
                  BLOCK_SIZE=block_size)


@functools.cache
def _compiled(fn, dynamic: bool | None):  # noqa: ANN001, ANN202
    # One compiled wrapper per function for the process. dynamic=None: a second shape
    # recompiles with dynamic lengths, then no more compiles.
    return torch.compile(fn, dynamic=dynamic)


def _flex(query: Tensor, key: Tensor, value: Tensor, mask: BlockMask,
          scale: float | None) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    # Compiled: eager FlexAttention is a reference implementation that builds the full scores.
    # Static shapes on CPU: Inductor's C++ FlexAttention template fails to build the dynamic
    # kernel of this mask (torch 2.13); CPU runs are forward checks of a few small shapes.
    flex = _compiled(flex_attention, None if query.is_cuda else False)
    return flex(query, key, value, block_mask=mask, scale=scale,
                enable_gqa=query.shape[1] != key.shape[1])


def _with_plan(sdpa, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,  # noqa: ANN001
               attention_mask: Tensor | None, dropout: float = 0.0,
               scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    plan = kwargs.pop(PLAN_KEY, None)
    if plan is None:
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                    **kwargs)
    plan.count.n += 1
    if plan.block_mask is not None and not dropout:  # FlexAttention has no dropout
        out = _flex(query, key, value, plan.block_mask, scaling)
        return out.transpose(1, 2).contiguous(), None
    groups = query.shape[1] // key.shape[1]
    # Grouped-query attention: PyTorch's CPU flash kernel takes the key/value heads as they
    # are (no repeated copies, a third of the saved keys/values for SmolLM2); elsewhere they
    # are repeated as transformers' repeat_kv does (GPU kernels may not take grouped heads
    # with the rejected call's mask).
    gqa = groups > 1 and query.device.type == "cpu"
    if groups > 1 and not gqa:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    out = segment_attention(query, key, value, plan.rows, scale=scaling, dropout=dropout,
                            gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def install() -> None:
    """Route ``sdpa`` attention calls that carry a plan through :func:`segment_attention`
    (once per process; calls without a plan run transformers' own function unchanged)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = functools.wraps(sdpa)(functools.partial(_with_plan, sdpa))
