"""Pad tokenized examples into batches of tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


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
    # Precomputed reference log-probs (see preftune.reference) travel with their pairs.
    for key in ("reference_chosen_logps", "reference_rejected_logps"):
        if all(key in e for e in examples):
            batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
    return batch


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
