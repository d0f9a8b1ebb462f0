"""``preftune pairs``: preference pairs from a model's own samples, ranked by a scorer.

The DPO paper's recipe for its sentiment and summarization experiments (Rafailov et al. 2023,
Sec. 6.1): sample completions of each prompt from the SFT model, let a reward rank them, and
train on the ranking; run on a DPO policy it is one round of iterative DPO. Each prompt gets
``n`` samples; ``pairs=best_worst`` keeps its best against its worst, ``pairs=all`` every
ordered pair of samples with different scores. Equal scores (ties, identical texts) make no
pair, and no sample is ever paired with itself. Rows are explicit prompt/chosen/rejected JSON
lines (message lists when the prompt is one) with ``chosen_score`` and ``rejected_score``;
the same model, prompts, settings and seed give the same file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .config import ConfigError, option
from .data.formats import Prompt
from .evalgen import Settings


@dataclass(kw_only=True)  # its required keys follow defaulted ones
class PairsConfig(Settings):
    """``preftune pairs model=... dataset=... output=... [key=value ...]``."""

    dataset: str | None = option(
        "data", None, "prompts: a preference dataset (its prompts) or JSON lines with a 'prompt' "
        "field (text or messages)", required="a local file or a hub dataset name")
    model: str | None = option(
        "model", None, "the model to sample from",
        required="a local Hugging Face folder, a hub id, or an alias")
    pairs: Literal["best_worst", "all"] = option(
        "eval", "best_worst", "per prompt: its best sample against its worst, or every ordered "
        "pair")
    output: str | None = option("eval", None, "the JSONL file to write", required="a .jsonl path")


def rank_pairs(scores: Sequence[float], mode: str) -> list[tuple[int, int]]:
    """(chosen, rejected) sample indices of one prompt: best against worst (first of equals),
    or every pair with a strictly higher-scored chosen; ties make no pair."""
    if mode == "best_worst":
        best = max(range(len(scores)), key=lambda i: scores[i])
        worst = min(range(len(scores)), key=lambda i: scores[i])
        return [(best, worst)] if scores[best] > scores[worst] else []
    return [(i, j) for i in range(len(scores)) for j in range(len(scores))
            if scores[i] > scores[j]]


def pair_rows(prompts: Sequence[Prompt], texts: Sequence[Sequence[str]],
              scores: Sequence[Sequence[float]], mode: str) -> list[dict[str, Any]]:
    """The JSONL rows: for a message-list prompt, responses are one assistant message."""
    rows = []
    for prompt, samples, values in zip(prompts, texts, scores, strict=True):
        def side(i: int, samples: Sequence[str] = samples, prompt: Prompt = prompt) -> Any:
            text = samples[i]
            return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]

        for i, j in rank_pairs(values, mode):
            rows.append({"prompt": prompt, "chosen": side(i), "rejected": side(j),
                         "chosen_score": values[i], "rejected_score": values[j]})
    return rows


def run_pairs_command(cfg: PairsConfig) -> int:
    from .data.tokenize import tokenize_prompt
    from .evalgen import device_for, load_policy_model, read_prompts, sample_prompts
    from .io import atomic_write
    from .models import load_tokenizer
    from .scorers import load_scorer

    if cfg.n < 2:
        raise ConfigError(f"n: a pair needs two samples of a prompt, got n={cfg.n}")
    device = device_for(cfg.device)
    scorer = load_scorer(cfg.scorer, device=str(device), batch_size=cfg.batch_size)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    prompts = read_prompts(cfg.dataset, cfg.dataset_format, tokenizer, limit=cfg.prompts)
    ids = [tokenize_prompt(p, tokenizer, cfg.max_prompt_length or 256, cfg.truncation or "auto")
           for p in prompts]
    model = load_policy_model(cfg.model, cfg, device)
    print(f"sampling {cfg.n} completions of {len(ids)} prompts ...", file=sys.stderr)
    samples = sample_prompts(model, tokenizer, ids, cfg, device)
    scores = [scorer(texts) for texts in samples.texts]
    rows = pair_rows(prompts, samples.texts, scores, cfg.pairs)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    ties = sum(not rank_pairs(s, "best_worst") for s in scores)
    print(f"{len(rows)} pairs from {len(prompts)} prompts ({ties} "
          f"{'prompt' if ties == 1 else 'prompts'} with all samples tied: no pair) written to "
          f"{out}")
    return 0
