"""Evaluation: objective metrics over a held-out set, and policy-vs-reference samples."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

Objective = Callable[..., tuple[Tensor, Counter]]


@torch.no_grad()
def evaluate(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    objective: Objective,
    batches: Iterable[dict[str, Tensor]],
    progress: bool = False,
    total: int | None = None,
) -> Counter:
    """Summed loss and metrics of ``objective`` over ``batches`` (no gradients); ``finalize``
    turns them into means once summed over every process. ``total``: the number of batches,
    for the progress bar (drawn only on a terminal)."""
    was_training = policy.training
    policy.eval()
    totals: Counter = Counter()
    bar = tqdm(desc="eval", unit="batch", total=total, leave=False,
               disable=not (progress and sys.stderr.isatty()), file=sys.stderr)
    for batch in batches:
        _, stats = objective(policy, reference, batch, 1.0)
        totals.update(stats)
        bar.update(1)
    bar.close()
    policy.train(was_training)
    return totals


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    pad_token_id: int,
    synced: bool = False,
) -> list[str]:
    """Greedy completions of left-padded prompts, decoded without special tokens.

    ``synced`` keeps sharded models in step across processes until all have finished."""
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        synced_gpus=synced,
    )
    model.train(was_training)
    new_tokens = out[:, prompt_ids.shape[1]:]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
