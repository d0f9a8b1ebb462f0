"""TR-DPO: the reference updated from the policy during training (soft and hard), its
checkpointing, and how it meets the precomputed reference."""

from __future__ import annotations

import copy

import pytest
import torch

from preftune.config import DPOConfig
from preftune.distributed import World
from preftune.reference import FrozenReference
from preftune.train import build_objective, make_state, train, train_step

from .conftest import records, run_settings, tiny_llama
from .test_step import VOCAB, _examples


def _state(sync: str, alpha: float = 0.5, every: int = 1):
    policy = tiny_llama(VOCAB, seed=0)
    cfg = DPOConfig(model="tiny", dataset="pairs.jsonl", beta=0.5, lr=1e-3, warmup_steps=0,
                    batch_size=4, micro_batch_size=2, sync_reference=sync, sync_alpha=alpha,
                    sync_every=every, precompute_reference=False)
    objective = build_objective(cfg, 0)
    reference = FrozenReference(copy.deepcopy(policy).requires_grad_(False),
                                objective.sequence_logps)
    return make_state(cfg, World(), policy, reference, objective, pad_id=0, total_steps=10)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_hard_sync_every_step_makes_the_reference_the_policy():
    state = _state("hard")
    start = _params(state.reference.model)
    for _ in range(2):
        train_step(state, _examples(n=4))
        policy, reference = _params(state.policy), _params(state.reference.model)
        assert all(torch.equal(a, b) for a, b in zip(policy, reference, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(start, policy, strict=True))


def test_soft_sync_mixes_and_alpha_zero_keeps_the_reference():
    state = _state("soft", alpha=0.25)
    before_ref = _params(state.reference.model)
    train_step(state, _examples(n=4))
    for ref0, pol, ref in zip(before_ref, _params(state.policy),
                              _params(state.reference.model), strict=True):
        torch.testing.assert_close(ref, 0.75 * ref0 + 0.25 * pol, rtol=1e-6, atol=1e-7)
    frozen = _state("soft", alpha=0.0)
    before = _params(frozen.reference.model)
    train_step(frozen, _examples(n=4))
    assert all(torch.equal(a, b) for a, b in zip(before, _params(frozen.reference.model),
                                                 strict=True))


def test_sync_every_is_the_cadence():
    state = _state("hard", every=2)
    start = _params(state.reference.model)
    train_step(state, _examples(n=4))
    assert all(torch.equal(a, b) for a, b in zip(start, _params(state.reference.model),
                                                 strict=True))
    train_step(state, _examples(n=4))
    assert all(torch.equal(a, b) for a, b in zip(_params(state.policy),
                                                 _params(state.reference.model), strict=True))


FAST = {"eval_examples": 2, "n_samples": 0, "lr": 1e-3, "max_steps": 3, "max_examples": 8}


def _run(tmp_path, model, name, **kw):
    return train(DPOConfig(**run_settings(tmp_path, model, name, **{**FAST, **kw})),
                 progress=False)


def test_sync_alpha_zero_is_dpo_and_resume_is_bitwise(tmp_path, tiny_model_dir, capfd):
    dpo = records(_run(tmp_path, tiny_model_dir, "dpo", precompute_reference=False))
    zero = records(_run(tmp_path, tiny_model_dir, "zero", sync_reference="soft",
                        sync_alpha=0.0, sync_every=1))
    assert "sync_reference=soft updates the reference during training: it is a live copy, " \
           "precompute_reference is off" in capfd.readouterr().err
    assert [r["loss"] for r in zero] == [r["loss"] for r in dpo]
    kw = {"sync_reference": "soft", "sync_alpha": 0.5, "sync_every": 1, "save_every": 1}
    whole = records(_run(tmp_path, tiny_model_dir, "whole", **kw), "train")
    _run(tmp_path, tiny_model_dir, "part", **{**kw, "max_steps": 2})
    resumed = records(_run(tmp_path, tiny_model_dir, "part", resume="true", **kw), "train")
    assert [r["loss"] for r in whole] == [r["loss"] for r in resumed]
    assert [r["rewards/margins"] for r in whole] == [r["rewards/margins"] for r in resumed]
    # the reference moved: the run is not DPO's
    assert whole[-1]["loss"] != pytest.approx(dpo[-2]["loss"], rel=1e-6)
