"""collate_pairs / collate_sft / pad_id_for: shapes, padding values, left-padded prompts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from preftune.data import (
    collate_pairs,
    collate_sft,
    pad_id_for,
    read_pairs,
    tokenize_pair,
    tokenize_sft,
)

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
PAD = 0


def example(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict[str, list[int]]:
    return {
        "prompt_input_ids": prompt,
        "chosen_input_ids": prompt + chosen,
        "chosen_labels": [-100] * len(prompt) + chosen,
        "rejected_input_ids": prompt + rejected,
        "rejected_labels": [-100] * len(prompt) + rejected,
    }


def test_collate_pairs_exact_values() -> None:
    batch = collate_pairs([example([5, 6], [7], [8, 9, 10]), example([11], [12, 13], [14])], PAD)
    assert set(batch) == {
        "chosen_input_ids",
        "chosen_attention_mask",
        "chosen_labels",
        "rejected_input_ids",
        "rejected_attention_mask",
        "rejected_labels",
        "prompt_input_ids",
        "prompt_attention_mask",
    }
    assert all(t.dtype == torch.long for t in batch.values())
    # One common length T = 5 (the longest of all chosen and rejected) for both sides.
    assert batch["chosen_input_ids"].tolist() == [[5, 6, 7, 0, 0], [11, 12, 13, 0, 0]]
    assert batch["chosen_attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert batch["chosen_labels"].tolist() == [
        [-100, -100, 7, -100, -100],
        [-100, 12, 13, -100, -100],
    ]
    assert batch["rejected_input_ids"].tolist() == [[5, 6, 8, 9, 10], [11, 14, 0, 0, 0]]
    assert batch["rejected_attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["rejected_labels"].tolist() == [
        [-100, -100, 8, 9, 10],
        [-100, 14, -100, -100, -100],
    ]
    # Prompts are left-padded for generation.
    assert batch["prompt_input_ids"].tolist() == [[5, 6], [0, 11]]
    assert batch["prompt_attention_mask"].tolist() == [[1, 1], [0, 1]]
    both = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    assert both.shape == (4, 5)


def test_collate_pairs_pad_id_is_used() -> None:
    batch = collate_pairs([example([1], [2], [3]), example([1, 1, 1], [2], [3])], 50256)
    assert batch["chosen_input_ids"][0].tolist() == [1, 2, 50256, 50256]
    assert batch["prompt_input_ids"][0].tolist() == [50256, 50256, 1]


def test_collate_sft() -> None:
    batch = collate_sft(
        [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}], 9
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_errors() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        collate_pairs([], PAD)
    with pytest.raises(ValueError, match="empty batch"):
        collate_sft([], PAD)
    bad = example([1], [2], [3])
    bad["chosen_labels"] = [2]
    with pytest.raises(ValueError, match="example 0 has 2 chosen_input_ids but 1 chosen_labels"):
        collate_pairs([bad], PAD)
    with pytest.raises(ValueError, match="no 'prompt_input_ids'"):
        collate_pairs([{"chosen_input_ids": [1]}], PAD)
    with pytest.raises(ValueError, match="example 1 has 1 input_ids but 2 labels"):
        collate_sft([{"input_ids": [1], "labels": [1]}, {"input_ids": [1], "labels": [1, 2]}], 0)


def test_pad_id_for() -> None:
    gpt2 = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "gpt2")
    assert gpt2.pad_token_id is None and pad_id_for(gpt2) == gpt2.eos_token_id == 50256
    qwen = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "qwen2.5")
    assert pad_id_for(qwen) == qwen.pad_token_id == 151643
    with pytest.raises(ValueError, match="neither pad_token_id nor eos_token_id"):
        pad_id_for(SimpleNamespace(pad_token_id=None, eos_token_id=None))


def test_real_hh_batch_round_trip() -> None:
    tok = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "gpt-neox-20b")
    path = ASSETS / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
    pairs = [p for _, p in zip(range(8), read_pairs(path), strict=False)]
    examples = [tokenize_pair(p, tok, max_length=128, max_prompt_length=64) for p in pairs]
    batch = collate_pairs(examples, pad_id_for(tok))
    lengths = [len(e[f"{s}_input_ids"]) for e in examples for s in ("chosen", "rejected")]
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape == (8, max(lengths))
    for i, e in enumerate(examples):
        for side in ("chosen", "rejected"):
            mask = batch[f"{side}_attention_mask"][i].bool()
            assert batch[f"{side}_input_ids"][i][mask].tolist() == e[f"{side}_input_ids"]
            assert batch[f"{side}_labels"][i][mask].tolist() == e[f"{side}_labels"]
        mask = batch["prompt_attention_mask"][i].bool()
        assert batch["prompt_input_ids"][i][mask].tolist() == e["prompt_input_ids"]
        assert bool(mask[-1])  # left padding: the prompt ends at the last column
    sft = collate_sft(
        [tokenize_sft(p, tok, max_length=128, max_prompt_length=64) for p in pairs], 1
    )
    assert sft["input_ids"].shape[0] == 8
