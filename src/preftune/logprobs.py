"""Sequence log-probabilities of labelled response tokens under a causal LM."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .data.tokenize import IGNORE_INDEX  # also imported from here by the loop and tests


def sequence_logps(logits: Tensor, labels: Tensor, *, average: bool = False,
                   token_weights: Tensor | None = None) -> Tensor:
    """Sum (or mean, with ``average``) of log p(label_t | tokens < t) over each row.

    ``logits`` is [B, T, V] and ``labels`` [B, T] aligned with the inputs: the logits at
    position t predict the label at t + 1, so both are shifted by one here. Positions
    labelled -100 are ignored. The log-softmax runs in float32 (float64 stays float64).
    ``token_weights`` [B, T - 1] (aligned with the shifted labels) multiply each token's
    log-prob before the sum. Returns a tensor of shape [B].
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
    if token_weights is not None:
        token_logps = token_logps * token_weights
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


def ld_token_weights(labels: Tensor, n_pairs: int, alpha: float) -> Tensor:
    """LD-DPO's token weights for the chosen rows then the rejected rows of ``labels``
    [2n, T]: 1 on a response's first min(|y_w|, |y_l|) scored tokens, ``alpha`` on the rest
    (Liu et al. 2024, "LD-DPO", arXiv:2409.06411, Eq. 9). Aligned with the shifted labels."""
    mask = labels[:, 1:] != IGNORE_INDEX
    position = mask.cumsum(-1)
    counts = mask.sum(-1)
    shared = torch.minimum(counts[:n_pairs], counts[n_pairs:]).repeat(2)
    tail = mask & (position > shared[:, None])
    ones = torch.ones((), dtype=torch.float32, device=labels.device)
    return torch.where(tail, ones * alpha, ones)


def concatenated_logps(
    model: torch.nn.Module, batch: dict[str, Tensor], *, average: bool = False,
    ld_alpha: float | None = None,
) -> PairLogps:
    """One forward pass over the chosen rows then the rejected rows of a collated batch.

    ``batch`` holds ``chosen_*`` and ``rejected_*`` input ids, attention masks and labels,
    padded to one common length (see ``preftune.data.collate_pairs``). ``average`` picks
    mean-per-token instead of summed sequence log-probs; ``ld_alpha`` weights the tokens of
    the longer response beyond the shorter one's length (``ld_token_weights``).
    """
    n = batch["chosen_input_ids"].shape[0]
    input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    weights = ld_token_weights(labels, n, ld_alpha) if ld_alpha is not None else None
    logps = sequence_logps(logits, labels, average=average, token_weights=weights)
    counts = token_counts(labels)
    return PairLogps(logps[:n], logps[n:], counts[:n], counts[n:])
