import json
import os

import pytest

from preftune.cli import main
from preftune.config import DPOConfig
from preftune.data import load_pairs
from preftune.pairs import rank_pairs
from preftune.train import held_out, train

from .conftest import HH_HELPFUL, run_settings

SCORER = "python:toy_scores:length_mod"  # few distinct values: ties are common


@pytest.fixture(autouse=True)
def toy_scorer(tmp_path, monkeypatch):
    (tmp_path / "toy_scores.py").write_text(
        "def length_mod(texts):\n    return [float(len(t) % 3) for t in texts]\n")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Tell me about item {i}."} for i in range(5)] + [{"prompt": "Tell me "
                                                                        "about item 0."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rank_pairs():
    assert rank_pairs([0.5, 2.0, -1.0, 2.0], "best_worst") == [(1, 2)]  # first of the best
    assert rank_pairs([1.0, 1.0, 1.0], "best_worst") == []
    assert rank_pairs([1.0, 0.0, 1.0], "all") == [(0, 1), (2, 1)]  # the tie (0, 2) is dropped
    assert all(i != j for i, j in rank_pairs([3.0, 1.0, 2.0, 0.0], "all"))
    assert len(rank_pairs([3.0, 1.0, 2.0, 0.0], "all")) == 6


def _pairs(tmp_path, tiny_model_dir, prompts_file, name, *extra):
    out = tmp_path / name
    rc = main(["pairs", f"model={tiny_model_dir}", f"dataset={prompts_file}", f"output={out}",
               "n=4", "max_new_tokens=4", f"scorer={SCORER}", "batch_size=5", *extra])
    assert rc == 0
    return out


def test_pairs_reproducible_no_self_pairs_no_ties(tmp_path, tiny_model_dir, prompts_file,
                                                   capfd):
    first = _pairs(tmp_path, tiny_model_dir, prompts_file, "a.jsonl", "pairs=all")
    # sampling reports its progress: 20 completions in batches of 5, a line after each but
    # the last
    done = [line.split()[0] for line in capfd.readouterr().err.splitlines()
            if line.endswith(" left") and "completions" in line]
    assert done == ["5/20", "10/20", "15/20"]
    again = _pairs(tmp_path, tiny_model_dir, prompts_file, "b.jsonl", "pairs=all")
    other = _pairs(tmp_path, tiny_model_dir, prompts_file, "c.jsonl", "pairs=all", "seed=1")
    assert first.read_bytes() == again.read_bytes() != other.read_bytes()
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert rows and {r["prompt"] for r in rows} <= {f"Tell me about item {i}." for i in range(5)}
    for r in rows:
        assert r["chosen_score"] > r["rejected_score"]  # ties dropped
        assert r["chosen"] != r["rejected"]
        assert r["chosen_score"] == len(r["chosen"]) % 3
        assert r["rejected_score"] == len(r["rejected"]) % 3
    # best_worst keeps one pair per prompt without an all-tied sample set, from the same samples
    best = _pairs(tmp_path, tiny_model_dir, prompts_file, "d.jsonl")
    best_rows = [json.loads(line) for line in best.read_text().splitlines()]
    assert len({r["prompt"] for r in best_rows}) == len(best_rows) <= 5
    assert {r["prompt"] for r in best_rows} == {r["prompt"] for r in rows}
    for r in best_rows:
        same = [x for x in rows if x["prompt"] == r["prompt"]]
        assert r["chosen_score"] == max(x["chosen_score"] for x in same)
        assert r["rejected_score"] == min(x["rejected_score"] for x in same)
    # the file is a preference dataset preftune reads back as it is
    pairs, report = load_pairs(first)
    assert len(pairs) == len(rows) and report.skipped == 0


def test_eval_of_a_model_against_itself(tmp_path, tiny_model_dir, prompts_file):
    out = tmp_path / "eval.json"
    rc = main(["eval", f"model={tiny_model_dir}", f"reference={tiny_model_dir}",
               f"dataset={prompts_file}", f"output={out}", "n=3", "max_new_tokens=5",
               f"scorer={SCORER}", "batch_size=4"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["prompts"] == 5 and len(result["samples"]) == 5  # the duplicate prompt once
    # same weights and seed: the same samples, so the KL estimate is 0 up to float rounding
    # (the policy's log-probs come from its sampling logits, the reference's from a forward;
    # test_winrate holds those two paths to the naive computation) and the win rate symmetric
    # (each sample's log-ratio, not only their mean: a small standard error too)
    assert result["kl"]["mean"] == pytest.approx(0.0, abs=1e-5) and result["kl"]["n"] == 15
    assert result["kl"]["stderr"] < 1e-5
    w = result["win_rate"]
    assert w["wins"] == w["losses"] and w["comparisons"] == 5 * 3 * 3 and w["ties"] >= 15
    assert result["score"]["policy"] == result["score"]["reference"]
    assert result["length"]["policy"]["mean"] <= 5
    for s in result["samples"]:
        assert [x["text"] for x in s["policy"]] == [x["text"] for x in s["reference"]]


def test_eval_reuses_the_reference_samples(tmp_path, tiny_model_dir, prompts_file,
                                           monkeypatch, capfd):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    entries = tmp_path / "cache" / "preftune" / "reference-samples"

    def run(name, *extra):
        out = tmp_path / name
        assert main(["eval", f"model={tiny_model_dir}", f"reference={tiny_model_dir}",
                     f"dataset={prompts_file}", f"output={out}", "n=2", "max_new_tokens=4",
                     f"scorer={SCORER}", "batch_size=4", *extra]) == 0
        return json.loads(out.read_text()), capfd.readouterr().err

    first, err = run("a.json")
    assert "reference samples: from cache" not in err and len(list(entries.iterdir())) == 1
    again, err = run("b.json")
    assert "reference samples: from cache" in err and again == first
    _, err = run("c.json", "seed=1")  # other settings: sampled, a second entry
    assert "from cache" not in err and len(list(entries.iterdir())) == 2
    for entry in entries.iterdir():
        entry.write_text('{"format": 1, "tokens": [[1]]}')
    redone, err = run("d.json")
    assert "damaged reference sample cache entry (expected token ids of 2 samples of each of 5 " \
           "prompts); sampling again" in err
    assert redone == first


def test_reference_samples_key_covers_weights_and_settings(tiny_model_dir):
    import torch

    from preftune.evalgen import Settings, samples_key
    from preftune.models import load_model, load_tokenizer

    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    ids, cpu = [[1, 2, 3], [4, 5]], torch.device("cpu")
    key = samples_key(model, tokenizer, ids, Settings(), cpu)
    assert key == samples_key(model, tokenizer, [[1, 2, 3], [4, 5]], Settings(), cpu)
    others = [samples_key(model, tokenizer, [[1, 2, 3], [4, 6]], Settings(), cpu)]
    others += [samples_key(model, tokenizer, ids, Settings(**{k: v}), cpu) for k, v in
               [("n", 5), ("temperature", 0.7), ("top_p", 0.9), ("max_new_tokens", 9),
                ("seed", 1), ("batch_size", 8)]]
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    others.append(samples_key(model, tokenizer, ids, Settings(), cpu))
    assert len({key, *others}) == 1 + len(others)


def test_eval_of_a_run_uses_its_held_out_prompts_and_reports(tmp_path, tiny_model_dir):
    run = train(DPOConfig(**run_settings(tmp_path, tiny_model_dir, "run", max_steps=1,
                                         eval_examples=6, n_samples=0, lr=1e-3)),
                progress=False)
    rc = main(["eval", str(run), "n=2", "max_new_tokens=4", f"scorer={SCORER}", "prompts=null"])
    assert rc == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["policy"] == str(run / "final") and result["reference"] == str(tiny_model_dir)
    pairs, _ = load_pairs(HH_HELPFUL, quiet=True)
    held = {p.prompt for p in held_out(pairs, 6)[0]}
    assert {s["prompt"] for s in result["samples"]} == held
    assert result["kl"]["mean"] != 0.0  # trained at a large lr: the policy moved
    html = (run / "report" / "report.html").read_text()
    assert "Sampled completions" in html and "win rate" in html


@pytest.mark.parametrize("args, message", [
    (["eval", "n=2"], "eval needs a run folder (preftune eval RUN_DIR) or model=, reference= "
                      "and dataset="),
    (["eval", "/no/such/run"], "run: /no/such/run has no config.yaml"),
    (["eval", "model=m", "reference=m", "dataset=d", "top_p=1.5"],
     "top_p: expected a float in (0, 1], got 1.5"),
    (["pairs", "model=m", "output=o.jsonl"], "dataset: required"),
    (["pairs", "model=m", "dataset=d", "output=o.jsonl", "n=1"],
     "n: a pair needs two samples of a prompt, got n=1"),
    (["pairs", "model=m", "dataset=d", "output=o.jsonl", "scorer=nope"],
     "scorer: unknown scorer 'nope'"),
])
def test_command_errors_are_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"preftune: error: {message}") and err.count("\n") == 1


def test_eval_scorer_during_training(tmp_path, tiny_model_dir):
    """eval_scorer logs generate/* at each eval (KL exactly 0 at step 0, where the policy is
    its reference), plots them, and leaves the training trajectory as it was."""
    from .conftest import records

    settings = {"max_steps": 2, "eval_every": 1, "eval_examples": 4, "n_samples": 2,
                "max_new_tokens": 4, "lr": 1e-3}
    judged = train(DPOConfig(**run_settings(tmp_path, tiny_model_dir, "judged",
                                            eval_scorer=SCORER, **settings)), progress=False)
    plain = train(DPOConfig(**run_settings(tmp_path, tiny_model_dir, "plain", **settings)),
                  progress=False)
    evals = records(judged, "eval")
    assert [r["step"] for r in evals] == [0, 1, 2]
    first = evals[0]
    assert first["generate/kl"] == 0.0 and first["generate/kl_stderr"] == 0.0
    assert first["generate/win_rate"] == pytest.approx((1 - first["generate/tie_rate"]) / 2)
    assert first["generate/score"] == first["generate/reference_score"]
    assert evals[-1]["generate/kl"] != 0.0
    assert all("generate/kl" not in r for r in records(plain, "eval"))
    assert [r["loss"] for r in records(judged, "train")] == \
        [r["loss"] for r in records(plain, "train")]
    assert {"win_rate.png", "scores.png", "kl.png"} <= {p.name for p in
                                                        (judged / "report").iterdir()}


def test_prompts_read_and_tokenized_as_training_does(tmp_path, gpt2_tokenizer):
    from transformers import AutoTokenizer

    from preftune.data import DataError
    from preftune.data.formats import PreferencePair
    from preftune.data.tokenize import tokenize_pair, tokenize_prompt
    from preftune.evalgen import read_prompts

    from .conftest import ASSETS

    qwen = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "qwen2.5")
    chat = [{"role": "user", "content": "What do you think of autumn?"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": chat}) + "\n" + json.dumps({"prompt": "plain"}) + "\n")
    assert read_prompts(str(path), None, qwen) == [chat, "plain"]
    pair = PreferencePair(chat, [{"role": "assistant", "content": "Lovely."}],
                          [{"role": "assistant", "content": "Dull."}], "x", "conversational")
    want = tokenize_pair(pair, qwen, max_length=256, max_prompt_length=128)["prompt_input_ids"]
    assert tokenize_prompt(chat, qwen, 128, "auto") == want
    text = " ".join(f"word{i}" for i in range(40))
    full = gpt2_tokenizer(text)["input_ids"]
    assert tokenize_prompt(text, gpt2_tokenizer, 10, "keep_start") == full[:10]
    assert tokenize_prompt(text, gpt2_tokenizer, 10, "keep_end") == full[-10:]
    path.write_text(json.dumps({"prompt": chat}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:2: prompt: expected text or a list of "):
        read_prompts(str(path), None, qwen)


def test_sentiment_frontier_runs_at_tiny_size(tmp_path):
    """benchmarks/sentiment_frontier.py --tiny: pairs, a DPO run, its evaluation; the plot,
    the JSON and the table."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"),
                                                         str(root / "benchmarks")])}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "sentiment_frontier.py"),
                           "--tiny", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((tmp_path / "frontier.json").read_text())
    assert [r["run"] for r in results] == ["DPO beta=0.1"]
    for r in results:
        assert r["kl"]["stderr"] >= 0 and -1 <= r["score"]["mean"] <= 1
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert "| DPO beta=0.1 |" in proc.stdout and "| reference | 0 |" in proc.stdout
