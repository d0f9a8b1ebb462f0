"""Tokenized examples into micro-batches of tensors: padded, or laid out for the fast paths.

``collate_pairs``/``collate_sft`` pad. ``collate_layout`` lays the pairs out as the fast paths
run them (:mod:`preftune.fastpath`): each pair as one ``[shared prefix, chosen tail, rejected
tail]`` sequence (``share_prompt``), units packed into rows (``pack``), with the index of the
position that predicts each scored token. It works on the token lists, on CPU, so the
micro-batch reaches the device ready for the forward: no padded tensors to un-pad, no host
sync. The segment and branch ids are what attention masks are built from (the 4D mask of
``PackedLayout.attention_mask``; an attention kernel's block mask would use the same ids).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..attention import Segment
from .tokenize import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PAIR_KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
REFERENCE_KEYS = ("reference_chosen_logps", "reference_rejected_logps")


def pad_id_for(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad_token_id, else its eos_token_id (padding is masked out anyway)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id to pad with")
    return int(pad)


def _column(examples: Sequence[dict[str, list[int]]], key: str) -> list[list[int]]:
    try:
        return [list(e[key]) for e in examples]
    except KeyError:
        raise ValueError(f"cannot collate: an example has no {key!r}") from None


def _check_labels(ids: list[list[int]], labels: list[list[int]], prefix: str) -> None:
    for i, (a, b) in enumerate(zip(ids, labels, strict=True)):
        if len(a) != len(b):
            raise ValueError(
                f"cannot collate: example {i} has {len(a)} {prefix}input_ids "
                f"but {len(b)} {prefix}labels"
            )


def _pad(seqs: list[list[int]], length: int, value: int, left: bool = False) -> torch.Tensor:
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            if left:
                out[row, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            else:
                out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def _mask(seqs: list[list[int]], length: int, left: bool = False) -> torch.Tensor:
    return _pad([[1] * len(s) for s in seqs], length, 0, left=left)


def collate_pairs(
    examples: Sequence[dict[str, list[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Batch the output of ``tokenize_pair``.

    Chosen and rejected are right-padded to one common length T (so a caller can
    ``torch.cat`` them into a 2B batch): ``{chosen,rejected}_{input_ids,attention_mask,labels}``
    of shape [B, T]; ids padded with ``pad_token_id``, labels with -100, mask 0 on padding.
    ``prompt_input_ids``/``prompt_attention_mask`` are left-padded [B, P] for generation.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    cols = {
        key: _column(examples, key)
        for key in (
            "prompt_input_ids",
            "chosen_input_ids",
            "chosen_labels",
            "rejected_input_ids",
            "rejected_labels",
        )
    }
    for name in ("chosen", "rejected"):
        _check_labels(cols[f"{name}_input_ids"], cols[f"{name}_labels"], f"{name}_")
    length = max(len(s) for name in ("chosen", "rejected") for s in cols[f"{name}_input_ids"])
    batch: dict[str, torch.Tensor] = {}
    for name in ("chosen", "rejected"):
        ids = cols[f"{name}_input_ids"]
        batch[f"{name}_input_ids"] = _pad(ids, length, pad_token_id)
        batch[f"{name}_attention_mask"] = _mask(ids, length)
        batch[f"{name}_labels"] = _pad(cols[f"{name}_labels"], length, IGNORE_INDEX)
    prompts = cols["prompt_input_ids"]
    prompt_length = max(len(p) for p in prompts)
    batch["prompt_input_ids"] = _pad(prompts, prompt_length, pad_token_id, left=True)
    batch["prompt_attention_mask"] = _mask(prompts, prompt_length, left=True)
    batch.update(_reference_logps(examples))
    return batch


def _reference_logps(examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
    """Precomputed reference log-probs (see preftune.reference), which travel with their
    pairs, as float32 tensors; {} when the examples do not all carry them."""
    return {key: torch.tensor([e[key] for e in examples], dtype=torch.float32)
            for key in REFERENCE_KEYS if all(key in e for e in examples)}


def pair_tokens(batch: Mapping[str, Any]) -> Tensor:
    """Real (non-padding) tokens of the chosen and rejected sequences of a pair micro-batch,
    padded or laid out; a 0-dim tensor on the batch's device."""
    if "tokens" in batch:
        return batch["tokens"]
    return batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()


def collate_sft(
    examples: Sequence[dict[str, list[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Batch ``tokenize_sft`` output: right-padded ``input_ids``, ``attention_mask``, ``labels``."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    ids = _column(examples, "input_ids")
    labels = _column(examples, "labels")
    _check_labels(ids, labels, "")
    length = max(len(s) for s in ids)
    return {
        "input_ids": _pad(ids, length, pad_token_id),
        "attention_mask": _mask(ids, length),
        "labels": _pad(labels, length, IGNORE_INDEX),
    }


# ----------------------------------------------------------------------------- pair layout

Examples = Sequence[Mapping[str, Sequence[int]]] | Mapping[str, Tensor]


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

    def to(self, device: torch.device | str) -> PackedLayout:
        """The same layout with its tensors on ``device``."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})

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


def pair_lists(examples: Examples) -> list[dict[str, list[int]]]:
    """Tokenized examples as lists (checked as ``collate_pairs`` checks them); a right-padded
    collated batch is un-padded."""
    if not isinstance(examples, Mapping):
        cols = {key: _column(examples, key) for key in PAIR_KEYS}
        for name in ("chosen", "rejected"):
            _check_labels(cols[f"{name}_input_ids"], cols[f"{name}_labels"], f"{name}_")
        return [{key: cols[key][i] for key in PAIR_KEYS} for i in range(len(examples))]
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
    """Lay a micro-batch out as model rows (the techniques: :mod:`preftune.fastpath`).

    ``token_budget`` caps a packed row's length; it is raised to the longest unit when
    smaller, and defaults to it. Without ``share_prompt`` and ``pack`` this is the plain
    layout of ``concatenated_logps`` (chosen rows then rejected rows, 2D padding mask).
    """
    rows_examples = pair_lists(examples)
    if not rows_examples:
        raise ValueError("cannot lay out an empty batch")
    return _layout(rows_examples, pad_token_id, share_prompt, pack, token_budget, device)


def _layout(
    rows_examples: list[dict[str, list[int]]],
    pad_token_id: int,
    share_prompt: bool,
    pack: bool,
    token_budget: int | None,
    device: torch.device | str | None,
) -> PackedLayout:
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


def collate_layout(
    examples: Sequence[Mapping[str, Any]],
    pad_token_id: int,
    *,
    share_prompt: bool = True,
    pack: bool = True,
    token_budget: int | None = None,
) -> dict[str, Any]:
    """A micro-batch of ``tokenize_pair`` outputs laid out for the fast paths, on CPU.

    ``{"layout": PackedLayout, "tokens": real tokens of the chosen and rejected sequences}``,
    plus the reference log-probs the examples carry (as ``collate_pairs``). Every value has a
    ``.to(device)``.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    lists = pair_lists(examples)
    layout = _layout(lists, pad_token_id, share_prompt, pack, token_budget, None)
    tokens = sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in lists)
    return {"layout": layout, "tokens": torch.tensor(tokens), **_reference_logps(examples)}
