"""LoRA through PEFT: only adapters train, the reference is the base, both exports load."""

import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from preftune.config import ConfigError, DPOConfig
from preftune.train import train

from .conftest import records as _records
from .conftest import run_settings

FAST = {"eval_examples": 4, "n_samples": 2, "max_new_tokens": 4, "lr": 1e-2, "save_every": 1,
        "optimizer": "adamw", "lora": True, "lora_r": 4, "lora_alpha": 8}


def _run(tmp_path, model, name, **kw):
    return train(DPOConfig(**run_settings(tmp_path, model, name, **{**FAST, **kw})),
                 progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Three steps with precomputed reference and adapter export; the same with a live
    reference and merged export; and the first run cut at step 2, then resumed."""
    tmp = tmp_path_factory.mktemp("lora")
    out = {"adapter": _run(tmp, tiny_model_dir, "adapter", lora_export="adapter"),
           "live": _run(tmp, tiny_model_dir, "live", precompute_reference=False)}
    _run(tmp, tiny_model_dir, "resumed", max_steps=2)
    out["resumed"] = _run(tmp, tiny_model_dir, "resumed", resume="true")
    return out


def test_lora_trains_only_adapters_and_starts_at_ln2(runs, tiny_model_dir):
    run = runs["adapter"]
    assert _records(run, "train")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    evals = _records(run, "eval")
    assert evals[-1]["loss"] < evals[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)

    # The adapter export holds LoRA weights only; applied to the base, only they differ.
    final = run / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    saved = load_file(final / "adapter_model.safetensors")
    assert saved and all("lora_" in name for name in saved)
    assert any(t.abs().max() > 0 for name, t in saved.items() if "lora_B" in name)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {n: t.clone() for n, t in base.state_dict().items()}
    tuned = PeftModel.from_pretrained(base, final)
    for name, tensor in tuned.get_base_model().state_dict().items():
        if "lora_" not in name:
            assert torch.equal(tensor, before[name.replace(".base_layer", "")]), name

    # Checkpoints are adapter-sized: the frozen base is not written again.
    ckpt = load_file(run / "checkpoints" / "step-2" / "model.safetensors")
    assert ckpt and all("lora_" in name for name in ckpt)
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and all("reference" in s for s in samples)


def test_live_reference_with_adapters_off_equals_the_precomputed_one(runs):
    live, pre = _records(runs["live"], "train"), _records(runs["adapter"], "train")
    assert live[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for a, b in zip(live, pre, strict=True):
        # float32 rounding of log-probs near -300 (the batches are laid out differently)
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=2e-5), key
    live_samples = (runs["live"] / "samples.jsonl").read_text().splitlines()
    pre_samples = (runs["adapter"] / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["reference"] for x in live_samples] == \
        [json.loads(x)["reference"] for x in pre_samples]


def test_merged_export_equals_base_plus_adapter(runs, tiny_model_dir):
    merged = runs["live"] / "final"
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    full = AutoModelForCausalLM.from_pretrained(merged).eval()
    via = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                    runs["adapter"] / "final").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[464, 3290, 318, 257, 1332, 13]])
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, via(ids).logits, rtol=1e-3, atol=1e-4)
        assert not torch.allclose(full(ids).logits, base(ids).logits, rtol=1e-3, atol=1e-4)


def test_lora_resume_continues_bitwise(runs):
    whole, resumed = _records(runs["adapter"], "train"), _records(runs["resumed"], "train")
    assert [r["loss"] for r in whole] == [r["loss"] for r in resumed]


def test_bad_lora_target_is_one_line(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"^lora_target_modules: .*no_such_layer"):
        _run(tmp_path, tiny_model_dir, "bad", lora_target_modules="no_such_layer")
