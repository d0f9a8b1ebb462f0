"""Exact resume after SIGKILL, atomic checkpoints, and non-finite steps contained."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune import checkpoint
from preftune.cli import main
from preftune.config import DPOConfig
from preftune.train import TrainingError, train

from .conftest import HH_HELPFUL, tiny_llama

BASE = {"max_length": 48, "max_prompt_length": 24, "eval_examples": 4, "n_samples": 0,
        "warmup_steps": 2, "eval_every": 2, "save_every": 1, "batch_size": 2,
        "micro_batch_size": 1, "max_examples": 12, "max_steps": 8, "lr": 1e-3,
        "optimizer": "adamw", "scheduler": "cosine"}


def _args(model, out, **kw):
    settings = {**BASE, "model": model, "dataset": HH_HELPFUL, "output_dir": out, **kw}
    return [f"{k}={v}" for k, v in settings.items()]


def _trajectory(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "examples_per_second"} for r in records]


def _weights(run):
    return load_file(run / "final" / "model.safetensors")


def _assert_same_run(a, b):
    assert _trajectory(a) == _trajectory(b)  # bitwise: floats compared exactly
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def test_resume_after_random_sigkills_is_bitwise_identical(tmp_path, tiny_model_dir):
    straight = tmp_path / "straight"
    assert main(["dpo", *_args(tiny_model_dir, straight)]) == 0

    run = tmp_path / "killed"
    rng = random.Random(7)
    kills = 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    while True:
        proc = subprocess.Popen([sys.executable, "-m", "preftune", "dpo",
                                 *_args(tiny_model_dir, run, resume="true")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        if kills < 3:
            # Wait for the next training step to be logged, then kill a random moment later:
            # mid-step, mid-eval or mid-checkpoint-write.
            target = kills * 2 + 1
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                steps = [r["step"] for r in _safe_records(run) if r["split"] == "train"]
                if steps and max(steps) >= target:
                    break
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.4))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert kills == 3, f"the run finished after {kills} kills"
    _assert_same_run(straight, run)
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["latest", "step-7", "step-8"]  # the final state is checkpointed too


def _safe_records(run):
    path = run / "metrics.jsonl"
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def test_crash_during_checkpoint_write_keeps_previous_and_resumes_exactly(
        tmp_path, tiny_model_dir, monkeypatch):
    cfg = {**BASE, "model": str(tiny_model_dir), "dataset": str(HH_HELPFUL), "max_steps": 4}
    straight = train(DPOConfig(**cfg, output_dir=str(tmp_path / "a")), progress=False)

    real_replace = os.replace

    def crash_on_step_3(src, dst):
        if str(dst).endswith("step-3"):
            raise KeyboardInterrupt  # the process dies between writing and renaming
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_step_3)
    run = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train(DPOConfig(**cfg, output_dir=str(run)), progress=False)
    assert checkpoint.latest_checkpoint(run) == run / "checkpoints" / "step-2"
    assert (run / "checkpoints" / ".step-3.tmp").is_dir()  # the half-made one, never used
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    train(DPOConfig(**cfg, output_dir=str(run), resume="true"), progress=False)
    _assert_same_run(straight, run)
    assert not (run / "checkpoints" / ".step-3.tmp").exists()


def test_crash_between_latest_and_prune_is_pruned_on_resume(tmp_path, tiny_model_dir,
                                                             monkeypatch):
    cfg = {**BASE, "model": str(tiny_model_dir), "dataset": str(HH_HELPFUL), "max_steps": 4}
    real_prune = checkpoint.prune_checkpoints

    def crash_after_step_3(run_dir, keep):
        if (run_dir / "checkpoints" / "step-3").is_dir():
            raise KeyboardInterrupt  # latest already names step-3; step-1 is still there
        real_prune(run_dir, keep)

    monkeypatch.setattr(checkpoint, "prune_checkpoints", crash_after_step_3)
    run = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        train(DPOConfig(**cfg, output_dir=str(run)), progress=False)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step-1", "step-2", "step-3"]
    monkeypatch.setattr(checkpoint, "prune_checkpoints", real_prune)
    (run / "checkpoints" / ".step-9.tmp").mkdir()  # as a crash mid-write leaves it
    # The resumed run only does step 4, checkpointed as the final state.
    train(DPOConfig(**cfg, output_dir=str(run), resume="true"), progress=False)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step-3", "step-4"]


def test_new_run_refuses_existing_folder_and_resume_checks_config(tmp_path, tiny_model_dir,
                                                                   capsys):
    run = tmp_path / "r"
    assert main(["dpo", *_args(tiny_model_dir, run, max_steps=2)]) == 0
    assert main(["dpo", *_args(tiny_model_dir, run, max_steps=2)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["dpo", *_args(tiny_model_dir, run, max_steps=2, beta=0.5, resume="true")]) == 2
    assert "resume: beta is 0.5 here but 0.1 in the run being resumed" in capsys.readouterr().err
    # Extending max_steps is allowed and continues from step 2.
    assert main(["dpo", *_args(tiny_model_dir, run, max_steps=3, resume="true")]) == 0
    steps = [r["step"] for r in _trajectory(run) if r["split"] == "train"]
    assert steps == [1, 2, 3]
    # The saved config is read as strictly as a recipe: a planted alias bomb is one line.
    bomb = Path(__file__).parent / "fixtures" / "bad" / "alias_bomb.yaml"
    (run / "config.yaml").write_text(bomb.read_text())
    assert main(["dpo", *_args(tiny_model_dir, run, max_steps=4, resume="true")]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'config.yaml'}: line" in err and "anchor or alias" in err, err


def _nan_model_and_data(tmp_path, tokenizer):
    """Explicit pairs where exactly one contains tokens whose embedding rows are NaN."""
    rows = [{"prompt": f"Question {i}: name a colour.\nAnswer:", "chosen": " Blue is calm.",
             "rejected": " I refuse."} for i in range(7)]
    rows.insert(3, {"prompt": "Question 9: name an instrument.\nAnswer:",
                    "chosen": " Xylophone zither", "rejected": " I refuse."})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    others = {t for r in rows[:3] + rows[4:] for text in r.values()
              for t in tokenizer(text).input_ids}
    poison = {t for t in tokenizer(rows[3]["chosen"]).input_ids} - others
    assert poison
    model = tiny_llama(vocab_size=len(tokenizer))
    with torch.no_grad():
        model.model.embed_tokens.weight[sorted(poison)] = float("nan")
    folder = tmp_path / "nan-model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, data


def test_nonfinite_step_is_skipped_and_repeated_ones_stop_the_run(tmp_path, gpt2_tokenizer):
    folder, data = _nan_model_and_data(tmp_path, gpt2_tokenizer)
    clean_eval = tmp_path / "eval.jsonl"
    clean_eval.write_text(json.dumps({"prompt": "Q:", "chosen": " yes", "rejected": " no"}) + "\n")
    cfg = {"model": str(folder), "dataset": str(data), "eval_dataset": str(clean_eval),
           "max_length": 32, "max_prompt_length": 16, "n_samples": 0, "warmup_steps": 0,
           "eval_every": 0, "save_every": 1, "batch_size": 2, "micro_batch_size": 2,
           "lr": 1e-3, "optimizer": "adamw", "epochs": 1}
    run = train(DPOConfig(**cfg, output_dir=str(tmp_path / "ok")), progress=False)
    train_records = [r for r in _trajectory(run) if r["split"] == "train"]
    assert len(train_records) == 4
    assert train_records[-1]["skipped_steps"] == 1
    bad = [r for r in train_records if r["loss"] != r["loss"]]  # NaN
    assert len(bad) == 1
    assert all(torch.isfinite(w).all() or "embed" in n for n, w in _weights(run).items())

    with pytest.raises(TrainingError) as stopped:
        train(DPOConfig(**cfg, output_dir=str(tmp_path / "stop"), max_nonfinite_steps=1),
              progress=False)
    # the poisoned pair comes at step 2, after step 1 was checkpointed
    last_good = tmp_path / "stop" / "checkpoints" / "step-1"
    assert str(stopped.value) == ("stopping: 1 non-finite steps in a row (last at step 2); last "
                                  f"good checkpoint: {last_good}")
    assert not (tmp_path / "stop" / "final").exists()


def test_preflight_fails_fast_when_disk_is_too_small(tmp_path, tiny_model_dir, monkeypatch,
                                                     capsys):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    assert main(["dpo", *_args(tiny_model_dir, tmp_path / "full")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("preftune: error: output_dir:") and "GB free" in err
    assert not (tmp_path / "full" / "metrics.jsonl").exists()


def test_checkpoint_state_loads_with_weights_only(tmp_path):
    model = tiny_llama(vocab_size=64)
    opt = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    path = checkpoint.save_checkpoint(tmp_path, 5, model, opt, {
        "rng": checkpoint.rng_state(), "counters": {"step": 5}}, keep=1)
    fresh = tiny_llama(vocab_size=64, seed=1)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    state = checkpoint.load_checkpoint(path, fresh, fresh_opt)  # torch.load(weights_only=True)
    assert state["counters"] == {"step": 5}
    assert fresh_opt.state_dict()["state"][0]["step"] == 1
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), n
    (path / "state.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.load_checkpoint(path, fresh)


def test_pruning_removes_half_deleted_old_checkpoints(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, model, optimizer, {}, keep=5)
    # a crash while pruning step-1 left it incomplete, so it no longer counts as a checkpoint
    (tmp_path / "checkpoints" / "step-1" / checkpoint.WEIGHTS_FILE).unlink()
    for step in (3, 4):
        checkpoint.save_checkpoint(tmp_path, step, model, optimizer, {}, keep=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["latest", "step-3", "step-4"]
