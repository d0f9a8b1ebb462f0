"""Sequence log-probabilities of labelled response tokens under a causal LM."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .data.tokenize import IGNORE_INDEX  # also imported from here by the loop and tests


def sequence_logps(logits: Tensor, labels: Tensor, *, average: bool = False) -> Tensor:
    """Sum (or mean, with ``average``) of log p(label_t | tokens < t) over each row.

    ``logits`` is [B, T, V] and ``labels`` [B, T] aligned with the inputs: the logits at
    position t predict the label at t + 1, so both are shifted by one here. Positions
    labelled -100 are ignored. The log-softmax runs in float32 (float64 stays float64).
    Returns a tensor of shape [B].
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    logits = logits[:, :-1]
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    targets = labels.masked_fill(~mask, 0)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # log p(target) = logit(target) - logsumexp(logits): no [B, T, V] log-softmax copy kept.
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    token_logps = (picked - torch.logsumexp(logits, dim=-1)) * mask
    total = token_logps.sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


def token_counts(labels: Tensor) -> Tensor:
    """Number of labelled (predicted) tokens per row, after the one-position shift."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


class PairLogps(NamedTuple):
    """Log-probs of a batch's chosen and rejected responses, with their token counts."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor


def concatenated_logps(
    model: torch.nn.Module, batch: dict[str, Tensor], *, average: bool = False
) -> PairLogps:
    """One forward pass over the chosen rows then the rejected rows of a collated batch.

    ``batch`` holds ``chosen_*`` and ``rejected_*`` input ids, attention masks and labels,
    padded to one common length (see ``preftune.data.collate_pairs``). ``average`` picks
    mean-per-token instead of summed sequence log-probs.
    """
    n = batch["chosen_input_ids"].shape[0]
    input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logps = sequence_logps(logits, labels, average=average)
    counts = token_counts(labels)
    return PairLogps(logps[:n], logps[n:], counts[:n], counts[n:])
