"""End-to-end training on a tiny real model with the real GPT-2 tokenizer and HH-RLHF data."""

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.cli import main
from preftune.config import DPOConfig, SFTConfig
from preftune.train import lr_factor, train

from .conftest import HH_HELPFUL, TINY_RUN, run_settings
from .conftest import records as _records

FAST = {"eval_examples": 8, "n_samples": 2, "max_new_tokens": 4}


def _dpo(tmp_path, model, name="dpo", **kw):
    return train(DPOConfig(**run_settings(tmp_path, model, name, **{**FAST, **kw})),
                 progress=False)


def test_sft_then_dpo_through_the_cli(tmp_path, tiny_model_dir, capsys):
    sft_out, dpo_out = tmp_path / "sft", tmp_path / "dpo"
    common = [f"{k}={v}" for k, v in {**TINY_RUN, **FAST, "max_examples": 8}.items()
              if k != "max_steps"] + [f"dataset={HH_HELPFUL}"]
    assert main(["sft", f"model={tiny_model_dir}", f"output_dir={sft_out}", "lr=1e-3",
                 *common]) == 0
    sft_train = _records(sft_out, "train")
    assert len(sft_train) == 2 and "rewards/accuracies" not in sft_train[0]
    assert sft_train[1]["loss"] < sft_train[0]["loss"]

    # The SFT output is a valid model (and reference) for DPO.
    assert main(["dpo", f"model={sft_out / 'final'}", f"output_dir={dpo_out}", *common]) == 0
    for name in ("config.yaml", "metrics.jsonl", "samples.jsonl", "data_report.json",
                 "report/report.html", "report/accuracy.png"):
        assert (dpo_out / name).is_file(), name
    cfg_text = (dpo_out / "config.yaml").read_text()
    assert f"reference: {sft_out / 'final'}" in cfg_text  # resolved default
    train_records = _records(dpo_out, "train")
    expected_keys = {"split", "step", "examples", "loss", "rewards/chosen", "rewards/rejected",
                     "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
                     "grad_norm", "lr", "tokens", "examples_per_second"}
    assert expected_keys <= set(train_records[0])
    evals = _records(dpo_out, "eval")
    assert [e["step"] for e in evals] == [0, 2]
    samples = [json.loads(line) for line in (dpo_out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {"prompt", "policy", "reference", "step"} <= set(samples[0])
    out = capsys.readouterr().out
    assert f"model saved to {dpo_out / 'final'}" in out and "rewards/accuracies" in out

    # The export loads with plain transformers and generates.
    model = AutoModelForCausalLM.from_pretrained(dpo_out / "final")
    tok = AutoTokenizer.from_pretrained(dpo_out / "final")
    ids = tok("\n\nHuman: hi\n\nAssistant:", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    assert gen.shape[1] == ids.shape[1] + 3


def test_first_dpo_loss_is_ln2(tmp_path, tiny_model_dir):
    # Bitwise on the plain path (the same forward for policy and reference) ...
    run = _dpo(tmp_path, tiny_model_dir, max_steps=1, precompute_reference=False,
               chunked_logps=False, share_prompt=False, pack=False)
    first = _records(run, "train")[0]
    assert first["loss"] == math.log(2) or first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["rewards/margins"] == 0.0
    # ... and to float32 rounding with the precomputed reference, whose batches differ.
    run = _dpo(tmp_path, tiny_model_dir, name="pre", max_steps=1)
    first = _records(run, "train")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert _records(run, "eval")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_gradient_accumulation_is_exact(tmp_path, tiny_model_dir):
    runs = [_dpo(tmp_path, tiny_model_dir, name=f"mb{m}", micro_batch_size=m, lr=1e-3,
                 optimizer="adamw") for m in (1, 4)]
    a, b = (_records(r, "train") for r in runs)
    for ra, rb in zip(a, b, strict=True):
        # Different micro-batches pad to different lengths, so the matmuls round differently:
        # agreement is to float32 rounding of log-probs of magnitude ~300, not bitwise.
        for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5), key
        for key in ("rewards/margins", "rewards/chosen"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-5), key
    wa, wb = (AutoModelForCausalLM.from_pretrained(r / "final").state_dict() for r in runs)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6)


def test_same_config_twice_gives_same_metrics(tmp_path, tiny_model_dir):
    runs = [_dpo(tmp_path, tiny_model_dir, name=f"r{i}", lr=1e-3) for i in range(2)]
    strip = lambda r: {k: v for k, v in r.items() if k != "examples_per_second"}  # noqa: E731
    a, b = ([strip(r) for r in _records(run, "train")] for run in runs)
    assert a == b


def test_overfitting_a_few_pairs_reaches_high_reward_accuracy(tmp_path, tiny_model_dir):
    run = _dpo(tmp_path, tiny_model_dir, max_examples=4, batch_size=4, micro_batch_size=4,
               max_steps=25, lr=5e-3, optimizer="adamw", beta=0.5)
    last = _records(run, "train")[-1]
    assert last["rewards/accuracies"] > 0.9
    assert last["loss"] < 0.3


def test_ipo_and_bf16_run_keep_float32_metrics(tmp_path, tiny_model_dir):
    run = _dpo(tmp_path, tiny_model_dir, loss="ipo", dtype="bfloat16", max_steps=1)
    first = _records(run, "train")[0]
    # IPO at h = 0 is (1 / (2 beta))^2 = 25 exactly when policy == reference.
    assert first["loss"] == pytest.approx(25.0, abs=1e-4)


def test_lr_schedule():
    assert lr_factor(0, 150, 1000, "constant") == pytest.approx(1 / 151)
    assert lr_factor(149, 150, 1000, "constant") == pytest.approx(150 / 151)
    assert lr_factor(500, 150, 1000, "constant") == 1.0
    assert lr_factor(575, 150, 1000, "linear") == pytest.approx(0.5)
    assert lr_factor(575, 150, 1000, "cosine") == pytest.approx(0.5)
    assert lr_factor(1000, 150, 1000, "cosine") == pytest.approx(0.0)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "preftune", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["betta=0.2"], "unknown key 'betta'; did you mean 'beta'?"),
    (["beta=-1"], "beta"),
    (["optimizer=sgd"], "optimizer: expected one of rmsprop, adamw"),
    (["max_prompt_length=600"], "max_prompt_length"),
])
def test_config_errors_exit_2_with_one_line(args, message, tiny_model_dir):
    proc = _cli("dpo", f"model={tiny_model_dir}", f"dataset={HH_HELPFUL}", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_dataset_file_exits_2(tmp_path, tiny_model_dir):
    proc = _cli("dpo", f"model={tiny_model_dir}", f"dataset={tmp_path / 'nope.jsonl'}",
                f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "nope.jsonl" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_lists_every_key_with_type_and_default():
    proc = _cli("dpo", "--help")
    assert proc.returncode == 0
    for key in ("beta", "label_smoothing", "micro_batch_size", "logps", "reference"):
        assert key in proc.stdout
    assert "0.1" in proc.stdout and "rmsprop" in proc.stdout
    assert "beta" not in _cli("sft", "--help").stdout


def test_sft_config_has_no_dpo_keys():
    assert not hasattr(SFTConfig, "beta") or "beta" not in SFTConfig.__dataclass_fields__


def test_fast_paths_match_the_plain_path_end_to_end(tmp_path, tiny_model_dir):
    plain = _dpo(tmp_path, tiny_model_dir, name="plain", lr=1e-3, chunked_logps=False,
                 share_prompt=False, pack=False, precompute_reference=False)
    fast = _dpo(tmp_path, tiny_model_dir, name="fast", lr=1e-3)
    for a, b in zip(_records(plain, "train"), _records(fast, "train"), strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (a["step"], key)
