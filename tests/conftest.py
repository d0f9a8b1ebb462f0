"""Shared test helpers: paths to the real assets and tiny real models built from configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
GPT2_TOKENIZER = ASSETS / "tokenizers" / "gpt2"
HH_HELPFUL = ASSETS / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"


def tiny_llama(vocab_size: int = 50257, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights: real code paths, runs in milliseconds."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        **overrides,
    })
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(vocab_size: int = 50257, seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=1024,
                        **overrides)
    return GPT2LMHeadModel(config).eval()


def random_head(hidden: int, seed: int = 0):
    """A float64 output-layer problem: hidden [11, H], weight [13, H] and bias [13] that require
    grad, and 11 targets (chunked log-prob tests)."""
    torch.manual_seed(seed)
    h = torch.randn(11, hidden, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, hidden, dtype=torch.float64, requires_grad=True)
    b = torch.randn(13, dtype=torch.float64, requires_grad=True)
    return h, w, b, torch.randint(0, 13, (11,))


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    return AutoTokenizer.from_pretrained(GPT2_TOKENIZER)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, gpt2_tokenizer) -> Path:
    """A saved tiny Llama with the real GPT-2 tokenizer: a valid `model=` folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab_size=len(gpt2_tokenizer)).save_pretrained(path)
    gpt2_tokenizer.save_pretrained(path)
    return path


# A tiny run: short sequences, few pairs, no warmup and no periodic eval. Test files add or
# override what they are about.
TINY_RUN = {"max_length": 64, "max_prompt_length": 32, "warmup_steps": 0, "eval_every": 0,
            "batch_size": 4, "micro_batch_size": 2, "max_examples": 16, "max_steps": 3}


def run_settings(tmp_path: Path, model: Path | str, name: str, **kw: Any) -> dict[str, Any]:
    """``TINY_RUN`` on the HH-RLHF test pairs, writing to ``tmp_path / name``; ``kw`` wins."""
    return {**TINY_RUN, "model": str(model), "dataset": str(HH_HELPFUL),
            "output_dir": str(tmp_path / name), **kw}


def records(run: Path, split: str | None = None, name: str = "metrics.jsonl") -> list[dict]:
    """The rows of a run's JSONL log, optionally only those of one ``split``."""
    rows = [json.loads(line) for line in (run / name).read_text().splitlines()]
    return [r for r in rows if split is None or r["split"] == split]
