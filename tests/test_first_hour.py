"""A new user's first hour: defaults that fit a short try, interrupts and resumes that say what
to do, no leftovers from a failed start, quiet logs, column mapping, the Python API."""

import gzip
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import preftune
from preftune import DPOConfig, SFTConfig
from preftune.cli import main
from preftune.data import DataError, read_pairs
from preftune.data.formats import load_pairs

from .conftest import HH_HELPFUL, records, run_settings, tiny_llama

SMALL = {"eval_examples": 4, "n_samples": 0}


def _args(settings: dict) -> list[str]:
    return [f"{k}={v}" for k, v in settings.items()]


def _metrics(run):
    return [{k: v for k, v in r.items() if k != "examples_per_second"} for r in records(run)]


def test_micro_batch_size_follows_a_small_batch_size():
    assert DPOConfig(model="m", dataset="d", batch_size=4).micro_batch_size == 4
    assert DPOConfig(model="m", dataset="d", batch_size=64).micro_batch_size == 8
    assert DPOConfig(model="m", dataset="d", batch_size=4, micro_batch_size=2).micro_batch_size \
        == 2


def test_warmup_is_capped_for_short_runs_only():
    from preftune.train import warmup_for

    unset = SFTConfig(model="m", dataset="d")
    assert [warmup_for(unset, n) for n in (8, 100, 1500, 5000)] == [0, 10, 150, 150]
    assert warmup_for(SFTConfig(model="m", dataset="d", warmup_steps=5), 8) == 5


def test_sft_saves_its_final_state_and_a_larger_max_steps_continues(tmp_path, tiny_model_dir,
                                                                    capfd):
    """batch_size=4 alone (no micro_batch_size) runs; the last step is checkpointed, config.yaml
    holds no resume, and resume=true with a larger max_steps continues and says from where."""
    settings = {k: v for k, v in run_settings(tmp_path, tiny_model_dir, "sft", **SMALL,
                                              max_steps=2).items() if k != "micro_batch_size"}
    assert main(["sft", *_args(settings)]) == 0
    run = tmp_path / "sft"
    assert (run / "checkpoints" / "step-2").is_dir()
    assert "resume" not in yaml.safe_load((run / "config.yaml").read_text())
    capfd.readouterr()
    assert main(["sft", *_args({**settings, "max_steps": 3, "resume": "true"})]) == 0
    err = capfd.readouterr().err
    assert "resumed from checkpoints/step-2 (step 2 of 3)" in err.splitlines()
    assert [r["step"] for r in records(run, "train")] == [1, 2, 3]
    assert "resume" not in yaml.safe_load((run / "config.yaml").read_text())


def test_interrupt_names_the_checkpoint_and_the_command_to_continue(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    settings = run_settings(tmp_path, tiny_model_dir, "run", **SMALL, max_steps=100000,
                            save_every=1, keep_checkpoints=1)
    proc = subprocess.Popen([sys.executable, "-m", "preftune", "sft", *_args(settings)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "latest").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    lines = err.splitlines()
    said = next(i for i, line in enumerate(lines) if line.startswith("preftune: interrupted"))
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert lines[said] == (f"preftune: interrupted; the latest checkpoint is "
                           f"{run / 'checkpoints' / latest}. Continue with:")
    assert shlex.split(lines[said + 1]) == [
        "preftune", "sft", *[a for a in _args(settings) if not a.startswith("output_dir=")],
        f"output_dir={run}", "resume=true"]
    assert "Traceback" not in err and "resume" not in yaml.safe_load(
        (run / "config.yaml").read_text())


def test_interrupt_before_any_checkpoint_says_so(tmp_path):
    from preftune.cli import interrupted_message

    assert interrupted_message("dpo", [], str(tmp_path / "none")) == (
        "preftune: interrupted before the first checkpoint; nothing to resume from yet")


def test_a_failed_start_leaves_no_folder_and_no_data_report(tmp_path, gpt2_tokenizer, capfd):
    """The model fails to load after the data was read (its vocabulary is smaller than the
    tokenizer's): neither the folder nor its parent that the run made is left."""
    model = tmp_path / "small-vocab"
    tiny_llama(vocab_size=100).save_pretrained(model)
    gpt2_tokenizer.save_pretrained(model)
    out = tmp_path / "runs" / "first"
    settings = run_settings(tmp_path, model, "runs/first", **SMALL)
    assert main(["dpo", *_args(settings)]) == 2
    assert "more than the model's vocabulary" in capfd.readouterr().err
    assert not out.exists() and not out.parent.exists()


def test_output_to_a_file_is_plain_lines(tmp_path, tiny_model_dir):
    """stderr that is not a terminal gets plain progress lines, no carriage returns and no
    third-party FutureWarnings; the skipped rows are one short line."""
    settings = run_settings(tmp_path, tiny_model_dir, "run", **SMALL)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}  # the reference pass runs
    proc = subprocess.run([sys.executable, "-m", "preftune", "dpo", *_args(settings)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    plan = [line for line in lines if line.startswith("plan: ")]
    assert len(plan) == 1 and re.fullmatch(
        r"plan: 16 training pairs, 4 held out; 3 steps of 4 \(micro-batches of 2\), warmup 0 "
        r"steps; about [\d,]+ tokens", plan[0]), plan
    assert any(re.fullmatch(r"reference pass over 16 pairs: about \d+s \(8 micro-batches; the "
                            r"first took \d+s\)", line) for line in lines), lines
    assert any(re.fullmatch(r"step 1 took \d+s: about \d+s for the 2 steps left \(evals and "
                            r"sampling extra\)", line) for line in lines), lines
    assert [line.split(":")[0] for line in lines if " step " in line and "/3" in line] == [
        "dpo step 1/3", "dpo step 2/3", "dpo step 3/3"]
    skipped = [line for line in lines if line.startswith("skipped ")]
    assert skipped == [f"skipped 8 of 2354 rows: empty response 4, identical responses 2, "
                       "prompt mismatch 2 "
                       f"(rows: {tmp_path / 'run'}/data_report.json, preftune data inspect)"]


RENAMES = {"prompt": "question", "chosen": "good", "rejected": "bad"}


def test_field_mapping_reads_a_renamed_file_as_the_original(tmp_path):
    original, _ = load_pairs(HH_HELPFUL, "hh")
    explicit = tmp_path / "explicit.jsonl"
    renamed = tmp_path / "renamed.jsonl"
    with explicit.open("w") as a, renamed.open("w") as b:
        for p in original[:50]:
            row = {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
            a.write(json.dumps(row) + "\n")
            b.write(json.dumps({RENAMES[k]: v for k, v in row.items()} | {"id": 1}) + "\n")

    def contents(pairs):
        return [(p.prompt, p.chosen, p.rejected, p.format) for p in pairs]

    want = contents(read_pairs(explicit))
    assert contents(read_pairs(renamed, fields=RENAMES)) == want
    cfg = DPOConfig(model="m", dataset=str(renamed), prompt_field="question",
                    chosen_field="good", rejected_field="bad")
    assert contents(load_pairs(renamed, fields=cfg.field_map())[0]) == want
    converted = tmp_path / "converted.jsonl"
    assert main(["data", "convert", str(renamed), str(converted), "--prompt-field", "question",
                 "--chosen-field", "good", "--rejected-field", "bad"]) == 0
    assert contents(read_pairs(converted)) == want
    with pytest.raises(DataError) as undetected:
        list(read_pairs(renamed))
    assert ("name your fields with prompt_field=, chosen_field=, rejected_field= (a message "
            "list: messages_field=) (here perhaps prompt_field=question chosen_field=good "
            "rejected_field=bad)") in str(undetected.value)


def test_python_api_with_rows_and_a_loaded_model_equals_the_cli(tmp_path, tiny_model_dir,
                                                                 capfd):
    pairs, _ = load_pairs(HH_HELPFUL)
    rows = [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs[:40]]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli = run_settings(tmp_path, tiny_model_dir, "cli", **SMALL, dataset=str(data))
    assert main(["dpo", *_args(cli)]) == 0

    listed = preftune.train(DPOConfig(**{**cli, "dataset": rows,
                                         "output_dir": str(tmp_path / "listed")}))
    assert listed == tmp_path / "listed"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    loaded = preftune.train(DPOConfig(**{**cli, "model": model, "tokenizer": tokenizer,
                                         "output_dir": str(tmp_path / "loaded")}))
    want = _metrics(tmp_path / "cli")
    assert len(want) == 5 and _metrics(listed) == want and _metrics(loaded) == want
    saved = yaml.safe_load((loaded / "config.yaml").read_text())
    assert (saved["model"], saved["tokenizer"]) == (
        "<LlamaForCausalLM object>", f"<{type(tokenizer).__name__} object>")
    assert yaml.safe_load((listed / "config.yaml").read_text())["dataset"] == (
        f"<list of {len(rows)} rows>")


def test_version_demo_help_and_a_closed_pipe():
    def cli(*args, **kw):
        return subprocess.run([sys.executable, "-m", "preftune", *args], capture_output=True,
                              text=True, timeout=120, **kw)

    assert cli("--version").stdout == f"preftune {preftune.__version__}\n"
    assert cli("demo", "--help").stdout.startswith("usage: preftune demo [key=value ...]")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the help is written, as `| head` ends early
    proc = subprocess.run([sys.executable, "-m", "preftune", "sft", "--help"], stdout=write,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_a_resumed_run_does_not_sample_the_reference_again(tmp_path, tiny_model_dir,
                                                           monkeypatch):
    import preftune.train as loop

    calls = []

    def counting(model, *args, **kw):
        calls.append(model)
        return real(model, *args, **kw)

    real = loop.generate
    monkeypatch.setattr(loop, "generate", counting)
    settings = run_settings(tmp_path, tiny_model_dir, "run", eval_examples=4, n_samples=2,
                            max_new_tokens=2, max_steps=2)
    loop.train(DPOConfig(**settings), progress=False)
    assert len(calls) == 2  # the reference, once before training; the policy at the end
    calls.clear()
    loop.train(DPOConfig(**{**settings, "max_steps": 3, "resume": "true"}), progress=False)
    assert len(calls) == 1  # the policy only
    rows = records(tmp_path / "run", name="samples.jsonl")
    assert [r["step"] for r in rows] == [2, 2, 3, 3]
    assert [r["reference"] for r in rows[:2]] == [r["reference"] for r in rows[2:]]


def test_rows_in_memory_read_as_the_file(tmp_path):
    from datasets import Dataset

    with gzip.open(HH_HELPFUL, "rt") as f:
        rows = [json.loads(next(f)) for _ in range(30)]

    def contents(pairs):
        return [(p.prompt, p.chosen, p.rejected, p.format) for p in pairs]

    want = contents(load_pairs(HH_HELPFUL)[0])[: len(load_pairs(rows)[0])]
    assert contents(load_pairs(rows)[0]) == want
    assert contents(load_pairs(Dataset.from_list(rows))[0]) == want
    assert DPOConfig(model="m", dataset=Dataset.from_list(rows)).dataset.num_rows == 30
    with pytest.raises(preftune.config.ConfigError, match="^model: expected a string or a "
                       "loaded model, got list$"):
        DPOConfig(model=[1], dataset="d")
