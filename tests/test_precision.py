"""dtype=bfloat16 on one process: bf16 compute (autocast) with float32 master weights and
optimizer state; master_weights=bfloat16 as the opt-in pure bf16 (preftune.precision)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file

from preftune.config import ConfigError, DPOConfig
from preftune.data import collate_pairs
from preftune.distributed import World
from preftune.fastpath import pair_logps
from preftune.logprobs import concatenated_logps
from preftune.models import enable_activation_checkpointing
from preftune.precision import check_learning_rate
from preftune.reference import FrozenReference
from preftune.train import build_objective, make_state, train, train_step, with_fast_paths

from .conftest import records, run_settings, tiny_llama
from .test_step import VOCAB, _examples

LN2 = math.log(2)


def _steps(dtype: str, master: str = "float32", steps: int = 4):
    """RMSprop at the DPO default lr 5e-7, no warmup, ``steps`` steps of 4 pairs against a
    live reference equal to the start: (per-step losses, the policy, its start, the state)."""
    policy = tiny_llama(VOCAB)
    if master == "bfloat16":
        policy = policy.to(torch.bfloat16)
    start = copy.deepcopy(policy)
    reference = copy.deepcopy(policy).requires_grad_(False)
    cfg = DPOConfig(model="tiny", dataset="pairs.jsonl", dtype=dtype, master_weights=master,
                    lr=5e-7, warmup_steps=0, batch_size=4, micro_batch_size=2)
    objective = with_fast_paths(build_objective(cfg, 0), [policy, reference], 64)
    state = make_state(cfg, World(), policy.train(), FrozenReference(
        reference, objective.sequence_logps), objective, 0, total_steps=steps)
    examples = _examples(n=4 * steps)
    losses = [train_step(state, examples[4 * i : 4 * i + 4])["loss"] for i in range(steps)]
    return losses, policy, start, state


def _delta(policy, start) -> torch.Tensor:
    return torch.cat([(p.detach().float() - s.detach().float()).flatten()
                      for p, s in zip(policy.parameters(), start.parameters(), strict=True)])


def test_bf16_compute_keeps_the_updates_float32_weights_make():
    f32, policy32, start, _ = _steps("float32")
    bf16, policy16, _, state = _steps("bfloat16")
    pure, pure_policy, pure_start, _ = _steps("bfloat16", master="bfloat16")
    assert all(p.dtype == torch.float32 for p in policy16.parameters())
    assert all(v.dtype == torch.float32 for s in state.optimizer.state.values()
               for v in s.values() if v.is_floating_point())
    want, got, lost = (_delta(policy32, start) != 0, _delta(policy16, start) != 0,
                       _delta(pure_policy, pure_start) != 0)
    assert want.float().mean() > 0.95
    # Every element float32 moves moves with float32 master weights; pure bf16 loses most.
    assert (want & got).sum() / want.sum() > 0.99
    assert (want & lost).sum() / want.sum() < 0.5
    # In the same direction: bf16 rounding of the gradients only.
    a, b = _delta(policy32, start), _delta(policy16, start)
    assert float(a @ b / a.norm() / b.norm()) > 0.99
    # Step 0 against a live reference (both through the default fast paths: chunked head,
    # shared prompt, packing): ln 2 to float32 rounding; then float32's losses to 1e-4.
    assert f32[0] == pytest.approx(LN2, abs=1e-6) and bf16[0] == pytest.approx(LN2, abs=1e-6)
    assert bf16 == pytest.approx(f32, abs=1e-4)


def test_fast_paths_match_the_plain_path_under_autocast():
    model = tiny_llama(VOCAB).train()
    enable_activation_checkpointing(model)
    examples = _examples(n=6)

    def run(logps):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = logps()
        (out.chosen - 0.5 * out.rejected).sum().backward()
        return torch.cat([out.chosen, out.rejected]), [p.grad for p in model.parameters()]

    plain, plain_grads = run(lambda: concatenated_logps(model, collate_pairs(examples, 0)))
    fast, fast_grads = run(lambda: pair_logps(model, examples, pad_token_id=0, chunk_size=4))
    # Log-probs (sums of about 30 tokens' float32 log-softmax) agree to 1e-4; gradients to 2%
    # of their norm (bf16 has 8 significant bits, 0.4%; the chunked head keeps float32).
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4)
    for a, b in zip(fast_grads, plain_grads, strict=True):
        assert float((a - b).norm() / b.norm()) < 0.02


def _run(tmp_path, model, name, **kw):
    settings = run_settings(tmp_path, model, name, max_length=48, max_prompt_length=24,
                            eval_examples=2, n_samples=1, max_new_tokens=2, batch_size=2,
                            micro_batch_size=1,
                            max_examples=8, **kw)
    return train(DPOConfig(**settings), progress=False)


def test_bf16_run_starts_at_ln2_exports_float32_and_resumes_bitwise(tmp_path, tiny_model_dir,
                                                                     monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kw = {"dtype": "bfloat16", "lr": 1e-3, "max_steps": 2, "save_every": 1}
    straight = _run(tmp_path, tiny_model_dir, "straight", **kw)
    # Policy and precomputed reference (the default fast paths) compute alike at step 0.
    assert records(straight, "eval")[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert records(straight, "train")[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    # The master weights as trained: bf16 would round away most of a low-lr run's updates.
    weights = load_file(straight / "final" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    # Checkpoints hold the float32 master weights and optimizer state: resuming is exact.
    resumed = _run(tmp_path, tiny_model_dir, "resumed", resume=str(
        straight / "checkpoints" / "step-1"), **kw)

    def last(run):
        return {k: v for k, v in records(run, "train")[-1].items()
                if k != "examples_per_second"}

    assert last(resumed) == last(straight)  # floats compared exactly
    again = load_file(resumed / "final" / "model.safetensors")
    assert again.keys() == weights.keys()
    assert all(torch.equal(again[k], weights[k]) for k in weights)


def test_pure_bf16_warns_when_lr_is_below_what_bf16_weights_resolve(tmp_path, tiny_model_dir,
                                                                     capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = _run(tmp_path, tiny_model_dir, "pure", dtype="bfloat16", master_weights="bfloat16",
               max_steps=1)
    warned = [line for line in capsys.readouterr().err.splitlines()
              if "master_weights=bfloat16: lr 5e-07 is below 2^-8 x the mean |weight|" in line]
    assert len(warned) == 1
    assert {t.dtype for t in load_file(run / "final" / "model.safetensors").values()} \
        == {torch.bfloat16}
    # The rule: lr < 2^-8 x mean |w| (about 0.02 here, so 8e-5); above it, no warning.
    model = tiny_llama(VOCAB).to(torch.bfloat16)
    cfg = DPOConfig(model="m", dataset="d", dtype="bfloat16", master_weights="bfloat16")
    assert check_learning_rate(cfg, model, show=False)
    assert not check_learning_rate(dataclasses.replace(cfg, lr=1e-3), model, show=False)
    assert not check_learning_rate(DPOConfig(model="m", dataset="d", dtype="bfloat16"), model)


@pytest.mark.parametrize("key", ["master_weights", "reduce_dtype"])
def test_bf16_only_keys_need_dtype_bfloat16(key):
    with pytest.raises(ConfigError, match=f"^{key}: bfloat16 applies only with dtype=bfloat16"):
        DPOConfig(model="m", dataset="d", **{key: "bfloat16"})
