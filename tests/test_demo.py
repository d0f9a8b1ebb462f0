import json

import pytest

from preftune import demo
from preftune.demo import JUDGE, generate
from preftune.scorers import load_scorer


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def prompt_of(row):
    return row["prompt"][0]["content"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("demo"), n_train=1000, n_eval=200, seed=0)


def test_rows_are_conversational_jsonl(files):
    assert set(files) == {"train", "eval"}
    assert [files["train"].name, files["eval"].name] == ["train.jsonl", "eval.jsonl"]
    train, held_out = read(files["train"]), read(files["eval"])
    assert (len(train), len(held_out)) == (1000, 200)
    for row in train + held_out:
        assert list(row) == ["prompt", "chosen", "rejected"]
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["chosen"]] == ["assistant"]
        assert [m["role"] for m in row["rejected"]] == ["assistant"]
        assert all(m["content"].strip() for key in row for m in row[key])
        assert row["chosen"][0]["content"] != row["rejected"][0]["content"]


def test_same_seed_same_bytes(files, tmp_path):
    again = generate(tmp_path, n_train=1000, n_eval=200, seed=0)
    for split in ("train", "eval"):
        assert again[split].read_bytes() == files[split].read_bytes()
    other = generate(tmp_path / "other", n_train=1000, n_eval=200, seed=1)
    assert other["train"].read_bytes() != files["train"].read_bytes()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_held_out_prompts_and_topics_never_in_train(tmp_path, seed):
    paths = generate(tmp_path, n_train=2000, n_eval=400, seed=seed)  # both splits wrap around
    train, held_out = read(paths["train"]), read(paths["eval"])
    assert not {prompt_of(r) for r in train} & {prompt_of(r) for r in held_out}
    train_topics, eval_topics = demo.split_topics(seed)
    assert not set(train_topics) & set(eval_topics)
    assert set(train_topics) | set(eval_topics) == set(demo.TOPICS)
    eval_prompts = {request.format(t=t) for t in eval_topics for request in demo.REQUESTS}
    train_prompts = {request.format(t=t) for t in train_topics for request in demo.REQUESTS}
    assert {prompt_of(r) for r in held_out} <= eval_prompts
    assert {prompt_of(r) for r in train} <= train_prompts


def test_prompts_used_once_before_repeating(files):
    train = [prompt_of(r) for r in read(files["train"])]
    assert len(set(train)) == len(train)  # 1000 < 1,476 distinct train prompts


def test_vader_scores_chosen_higher(files):
    vader = load_scorer("vader")
    rows = read(files["train"]) + read(files["eval"])
    chosen = vader([row["chosen"][0]["content"] for row in rows])
    rejected = vader([row["rejected"][0]["content"] for row in rows])
    assert all(c > r for c, r in zip(chosen, rejected, strict=True))
    assert isinstance(JUDGE, str) and JUDGE.endswith(".")


def test_sequences_are_short(files):
    words = [
        len((prompt_of(r) + " " + r[side][0]["content"]).split())
        for r in read(files["train"])
        for side in ("chosen", "rejected")
    ]
    assert max(words) <= 30  # about 40 tokens; with a chat template's extras still under 64


def test_rejects_empty_splits(tmp_path):
    with pytest.raises(ValueError, match="n_train and n_eval must be >= 1"):
        generate(tmp_path, n_train=0)


def test_demo_command_end_to_end_at_reduced_size(tmp_path, monkeypatch, capsys):
    """`preftune demo` with a tiny model (Qwen2.5 tokenizer and chat template) and 2 steps."""
    from transformers import AutoTokenizer

    from preftune.cli import main

    from .conftest import ASSETS, tiny_llama

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "qwen2.5")
    model_dir = tmp_path / "tiny-qwen-vocab"
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    rc = main(["demo", f"model={model_dir}", f"output_dir={out}", "max_steps=2",
               "eval_examples=4", "n_samples=2", "max_new_tokens=3", "eval_every=0"])
    assert rc == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["prompts"] == 2 and summary["n"] == 2 and len(summary["examples"]) == 2
    assert summary["eval_first"]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert summary["win_rate"]["comparisons"] == 2 * 2 * 2 and summary["kl"]["n"] == 4
    assert json.loads((out / "eval.json").read_text())["scorer"] == "vader"
    assert "policy against reference" in (out / "report" / "report.html").read_text()
    text = capsys.readouterr().out
    assert "win rate" in text and "KL(policy || reference)" in text and "reference:" in text
    # The held-out prompts of the run are the generated eval file's, never trained on.
    train_rows = (tmp_path / "cache" / "preftune" / "demo-data" / "seed-0" / "train.jsonl")
    train_prompts = {json.loads(line)["prompt"][0]["content"]
                     for line in train_rows.read_text().splitlines()}
    assert all(not any(p in ex["prompt"] for p in train_prompts) for ex in summary["examples"])
