"""Evaluation: objective metrics over a held-out set, and policy-vs-reference samples."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .logprobs import IGNORE_INDEX, sequence_logps

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


# Sampling for the generation eval (preftune.evalgen) and for making pairs (preftune.pairs).


def eos_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS and the model's
    generation-config EOS ids (chat models often end a turn on a token of their own)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list | tuple) else [configured])
    return sorted(i for i in ids if i is not None)


def completion_mask(new_ids: Tensor, eos: list[int]) -> Tensor:
    """1 for each generated token up to and including the first EOS of its row, 0 after it
    (``generate`` pads finished rows)."""
    is_eos = torch.isin(new_ids, torch.tensor(eos, dtype=new_ids.dtype, device=new_ids.device))
    before = is_eos.long().cumsum(1) - is_eos.long()  # EOS tokens strictly before each position
    return (before == 0).long()


@torch.no_grad()
def sample(model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, *,
           max_new_tokens: int, pad_token_id: int, eos: list[int], temperature: float = 1.0,
           top_p: float = 1.0, logps: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """Sampled completions of left-padded prompts: new token ids ``[B, T]``, their
    ``completion_mask`` and, with ``logps``, the summed log-probability ``[B]`` of each
    completion under ``model`` (float32), read off the logits the sampling drew from: what
    ``completion_logps`` recomputes, without its forward. The sampling distribution is
    softmax(logits / temperature) cut to its top-p nucleus: the model's own settings of top-k,
    repetition penalty, typical-p and n-gram blocking are overridden. Randomness comes from
    torch's global generator (seed it before)."""
    from transformers import (
        GenerationConfig,
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    # Temperature and top-p are applied here, after `_StepLogps`, so that it sees raw logits
    # (generate would put its own warpers after ours only by an order it does not promise).
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                              repetition_penalty=1.0, typical_p=1.0, no_repeat_ngram_size=0,
                              max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                              eos_token_id=eos or None, return_dict_in_generate=True)
    recorder = _StepLogps() if logps else None
    processors = LogitsProcessorList([recorder] if recorder else [])
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    was_training = model.training
    model.eval()
    # n samples of a prompt: its tokens but the last run once, generate goes on from there
    shared = _shared_prefill(model, prompt_ids, prompt_mask, prompt_ids.shape[1] - 1)
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                         generation_config=config, logits_processor=processors,
                         **({} if shared is None else {_cache_name(model): shared[0]}))
    model.train(was_training)
    new_ids = out.sequences[:, prompt_ids.shape[1]:]
    mask = completion_mask(new_ids, eos)
    if recorder is None:
        return new_ids, mask, None
    return new_ids, mask, (recorder.finish(new_ids) * mask).sum(1)


class _StepLogps:
    """A logits processor that keeps log p of each drawn token under the raw logits, holding
    one step's ``[B, V]`` logits at a time (``output_logits`` would hold all T steps until
    generate returns: GBs for a large vocabulary). Step t's token is known at call t + 1
    (the last column of ``input_ids``) or, for the last step, from the output."""

    def __init__(self) -> None:
        self.steps: list[Tensor] = []
        self.pending: tuple[Tensor, Tensor] | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.pending is not None:
            self._settle(input_ids[:, -1])
        logits = scores.to(torch.float32, copy=True)  # a copy: a later warper may edit scores
        self.pending = logits, logits.logsumexp(-1)
        return scores

    def _settle(self, tokens: Tensor) -> None:
        # logit - logsumexp, as `sequence_logps` computes it for the same logits
        logits, lse = self.pending
        self.steps.append(logits.gather(1, tokens.unsqueeze(1)).squeeze(1) - lse)
        self.pending = None

    def finish(self, new_ids: Tensor) -> Tensor:
        """Per-token log-probs ``[B, T]`` of the generated ids."""
        self._settle(new_ids[:, -1])
        assert len(self.steps) == new_ids.shape[1], "one processor call per generated token"
        return torch.stack(self.steps, dim=1)


@torch.no_grad()
def completion_logps(model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                     new_ids: Tensor, new_mask: Tensor) -> Tensor:
    """Summed log-probability ``[B]`` of each row's completion tokens (where ``new_mask`` is 1)
    under ``model`` given its left-padded prompt, in float32; positions as ``generate`` numbers
    them (counting real tokens only)."""
    was_training = model.training
    model.eval()
    ids = torch.cat([prompt_ids, new_ids], dim=1)
    mask = torch.cat([prompt_mask, new_mask], dim=1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    width = prompt_ids.shape[1]
    # logits at the last prompt position and every completion position: [B, T + 1, V]
    shared = _shared_prefill(model, prompt_ids, prompt_mask, width)
    if shared is not None:  # each distinct prompt once; the completions attend to its cache
        cache, last = shared
        rest = model(input_ids=new_ids, attention_mask=mask, position_ids=positions[:, width:],
                     use_cache=True, **{_cache_name(model): cache})
        logits = torch.cat([last.unsqueeze(1), rest.logits], dim=1)
    else:  # the output layer only at those positions: prompt positions would be most of the
        # [B, L, V] logits and of the time
        keep = new_ids.shape[1] + 1
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                       **_keep_last(model, keep)).logits[:, -keep:]
    model.train(was_training)
    labels = torch.cat([torch.full_like(new_ids[:, :1], IGNORE_INDEX),
                        new_ids.masked_fill(new_mask == 0, IGNORE_INDEX)], dim=1)
    return sequence_logps(logits, labels)


def _shared_prefill(model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                    length: int) -> tuple[object, Tensor] | None:
    """Where neighbouring rows hold the same prompt (the ``n`` samples of each), run each
    distinct prompt once over its first ``length`` positions and expand its KV cache to every
    row: (the cache, each row's logits at position ``length - 1``). None when no rows repeat
    or the model's cache cannot be expanded; the caller then runs every row in full."""
    same = (prompt_ids[1:] == prompt_ids[:-1]).all(1)
    if length < 1 or not bool(same.any()):
        return None
    group = torch.cat([same.new_zeros(1, dtype=torch.long), (~same).long().cumsum(0)])
    first = torch.cat([same.new_ones(1), ~same]).nonzero().squeeze(1)
    ids, mask = prompt_ids[first, :length], prompt_mask[first, :length]
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                use_cache=True, **_keep_last(model, 1))
    cache = getattr(out, _cache_name(model), None)
    if not hasattr(cache, "batch_select_indices"):
        return None
    cache.batch_select_indices(group)  # type: ignore[union-attr]
    return cache, out.logits[:, -1][group]


def _forward_name(model: torch.nn.Module, *names: str) -> str | None:
    """The first of ``names`` that ``model.forward`` takes, or None (transformers renames
    arguments between versions)."""
    import inspect

    taken = inspect.signature(model.forward).parameters
    return next((name for name in names if name in taken), None)


def _cache_name(model: torch.nn.Module) -> str:
    """The KV cache argument (and output field): ``cache`` from transformers 5.24,
    ``past_key_values`` before."""
    return _forward_name(model, "cache") or "past_key_values"


def _keep_last(model: torch.nn.Module, n: int) -> dict[str, int]:
    """The forward argument that limits logits to the last ``n`` positions, where the model
    has one (``logits_to_keep``; ``num_logits_to_keep`` before transformers 4.50)."""
    name = _forward_name(model, "logits_to_keep", "num_logits_to_keep")
    return {} if name is None else {name: n}
