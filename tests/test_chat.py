"""Chat models end to end: conversational pairs through the real Qwen2.5 and Phi-3 chat templates.

Tokenization is checked against ``apply_chat_template(..., tokenize=True)`` (what the model
sees at inference), and ``preftune sft`` then ``preftune dpo`` run through the CLI on a tiny
random Llama whose vocabulary covers each tokenizer.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from preftune.cli import main
from preftune.data import load_pairs, tokenize_pair, tokenize_sft

from .conftest import ASSETS, tiny_llama

TOKENIZERS = ASSETS / "tokenizers"
DEMO = ASSETS / "data" / "llamafactory" / "dpo_en_demo.json"

# The generation prompt each template ends a prompt with, as it decodes from the prompt ids
# (Phi-3's tokenizer drops the "\n" after its special tokens, so it is not in the ids).
GENERATION_PROMPT = {"qwen2.5": "<|im_start|>assistant\n", "phi-3-mini": "<|assistant|>"}
# The end-of-turn text that closes every assistant turn (and the tokenizer's EOS token).
END_OF_TURN = {"qwen2.5": ("<|im_end|>", "<|im_end|>"), "phi-3-mini": ("<|end|>", "<|endoftext|>")}

# Every prompt of the rows used fits in max_prompt_length (Qwen2.5: 36-69 tokens).
FAST = ["max_length=96", "max_prompt_length=72", "eval_examples=2", "n_samples=1",
        "max_new_tokens=3", "warmup_steps=0", "eval_every=0", "batch_size=4",
        "micro_batch_size=2", "max_steps=2"]


@functools.cache
def load_chat_tokenizer(name: str):
    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


@pytest.fixture(params=sorted(GENERATION_PROMPT))
def chat_tokenizer(request):
    return request.param, load_chat_tokenizer(request.param)


@pytest.fixture(scope="module")
def demo_rows() -> list[dict]:
    return json.loads(DEMO.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def demo_pairs():
    return load_pairs(DEMO, quiet=True)[0]


def template_ids(tokenizer, messages, generation: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True,
                                        add_generation_prompt=generation)
    ids = out["input_ids"] if hasattr(out, "keys") else out  # BatchEncoding in transformers 5
    return list(ids)


# --- tokenization on real data ----------------------------------------------------------------

# Every 7th row of the 300: single- and multi-turn conversations (up to 7 prompt messages).
ROWS = range(0, 300, 7)


def test_demo_pairs_tokenize_as_the_chat_template(chat_tokenizer, demo_pairs) -> None:
    name, tok = chat_tokenizer
    turn_end, eos_text = END_OF_TURN[name]
    assert tok.eos_token == eos_text
    assert {len(demo_pairs[i].prompt) for i in ROWS} >= {1, 2, 5, 7}
    for i in ROWS:
        pair = demo_pairs[i]
        out = tokenize_pair(pair, tok, max_length=8192, max_prompt_length=4096)
        prompt = out["prompt_input_ids"]
        assert prompt == template_ids(tok, pair.prompt, generation=True), i
        for side in ("chosen", "rejected"):
            full = template_ids(tok, pair.prompt + getattr(pair, side), generation=False)
            # Both templates end the conversation with the EOS token (Qwen: "<|im_end|>\n",
            # Phi-3: "<|end|>\n<|endoftext|>"), so no EOS is appended: the ids are exactly
            # those of the rendered conversation.
            assert out[f"{side}_input_ids"] == full, (i, side)
            response = tok.decode(full[len(prompt):])
            assert response.rstrip().endswith(eos_text) and turn_end in response
            assert out[f"{side}_labels"] == [-100] * len(prompt) + full[len(prompt):]


def test_sft_labels_mask_exactly_the_chat_prompt(chat_tokenizer, demo_pairs) -> None:
    name, tok = chat_tokenizer
    for i in ROWS:
        pair = demo_pairs[i]
        prompt = template_ids(tok, pair.prompt, generation=True)
        full = template_ids(tok, pair.prompt + pair.chosen, generation=False)
        sft = tokenize_sft(pair, tok, max_length=8192, max_prompt_length=4096)
        assert sft["input_ids"] == full
        assert sft["labels"] == [-100] * len(prompt) + full[len(prompt):], i
        assert tok.decode(sft["input_ids"][: len(prompt)]).endswith(GENERATION_PROMPT[name])

        # Truncated (keep_end by default for conversational data; only the chosen response
        # counts for SFT): the mask covers exactly the prompt tokens that were kept.
        short = tokenize_sft(pair, tok, max_length=128, max_prompt_length=64)
        kept, response = prompt, full[len(prompt):]
        if len(kept) + len(response) > 128 and len(kept) > 64:
            kept = kept[-64:]
        if len(kept) + len(response) > 128:
            response = response[: 128 - 64]
        assert short == {"input_ids": kept + response,
                         "labels": [-100] * len(kept) + response}, i


# --- SFT then DPO through the CLI -------------------------------------------------------------

def _short_rows(rows: list[dict], n: int = 16) -> list[dict]:
    """The first ``n`` single-turn rows with a short question: their prompts fit in
    max_prompt_length, so every sampled prompt ends with the generation prompt."""
    return [r for r in rows if len(r["conversations"]) == 1
            and len(r["conversations"][0]["value"]) < 200][:n]


def _as_trl_messages(row: dict) -> dict:
    roles = {"human": "user", "gpt": "assistant"}
    msg = lambda m: {"role": roles[m["from"]], "content": m["value"]}  # noqa: E731
    return {"prompt": [msg(m) for m in row["conversations"]], "chosen": [msg(row["chosen"])],
            "rejected": [msg(row["rejected"])]}


def _write_dataset(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _template_written(folder: Path) -> bool:
    saved = [folder / "chat_template.jinja", folder / "tokenizer_config.json"]
    return any(f.is_file() and "add_generation_prompt" in f.read_text(encoding="utf-8")
               for f in saved)


def _assert_chat_tokenizer_saved(folder: Path, original, conversation) -> None:
    assert _template_written(folder), f"no chat template written in {folder}"
    reloaded = AutoTokenizer.from_pretrained(folder)
    assert reloaded.chat_template == original.chat_template
    assert len(reloaded) == len(original) and reloaded.eos_token == original.eos_token
    for generation in (True, False):
        messages = conversation[:1] if generation else conversation
        kw = {"tokenize": False, "add_generation_prompt": generation}
        assert (reloaded.apply_chat_template(messages, **kw)
                == original.apply_chat_template(messages, **kw))
        assert (template_ids(reloaded, messages, generation)
                == template_ids(original, messages, generation))


# Qwen2.5 reads the ShareGPT rows as they are, Phi-3 the same rows in TRL messages form:
# both conversational layouts go end to end without doubling the runtime.
@pytest.mark.parametrize("name, layout", [("qwen2.5", "sharegpt"),
                                          ("phi-3-mini", "trl-messages")])
def test_sft_then_dpo_on_chat_data(name, layout, demo_rows, tmp_path, monkeypatch):
    tok = load_chat_tokenizer(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # reference log-probs cache
    rows = _short_rows(demo_rows)
    assert len(rows) == 16
    if layout == "trl-messages":
        rows = [_as_trl_messages(r) for r in rows]
    data = _write_dataset(tmp_path / f"{layout}.jsonl", rows)
    pairs = load_pairs(data, quiet=True)[0]
    assert len(pairs) == 16 and all(p.is_conversational for p in pairs)

    base = tmp_path / "base"
    tiny_llama(vocab_size=len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    sft_out, dpo_out = tmp_path / "sft", tmp_path / "dpo"
    common = [*FAST, f"dataset={data}"]

    assert main(["sft", f"model={base}", f"output_dir={sft_out}", "lr=1e-3", *common]) == 0
    sft_train = [r for r in _jsonl(sft_out / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in sft_train] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in sft_train)
    assert _template_written(sft_out / "final")

    assert main(["dpo", f"model={sft_out / 'final'}", f"output_dir={dpo_out}", *common]) == 0
    metrics = _jsonl(dpo_out / "metrics.jsonl")
    first = next(r for r in metrics if r["split"] == "train")
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert next(r for r in metrics if r["split"] == "eval")["loss"] == pytest.approx(
        math.log(2), abs=1e-5)
    assert f"reference: {sft_out / 'final'}" in (dpo_out / "config.yaml").read_text()

    # The tokenizer and its chat template survive both exports (the DPO run loaded its
    # tokenizer from the SFT export, so the template went through two save/load rounds).
    _assert_chat_tokenizer_saved(dpo_out / "final", tok, pairs[0].prompt + pairs[0].chosen)

    # Sampled prompts are the held-out prompts rendered with the generation prompt (decoded
    # with special tokens), i.e. the model is asked to answer as the assistant.
    rendered = {tok.decode(template_ids(tok, p.prompt, generation=True)) for p in pairs}
    for run, sides in ((sft_out, {"policy"}), (dpo_out, {"policy", "reference"})):
        samples = _jsonl(run / "samples.jsonl")
        assert samples, run
        for sample in samples:
            assert sides <= set(sample)
            assert sample["prompt"].endswith(GENERATION_PROMPT[name])
            assert sample["prompt"] in rendered
