"""Training with the other losses, their state across resume, and the logging sinks."""

import math

import pytest

from preftune.config import DPOConfig
from preftune.train import train

from .conftest import records, run_settings

FAST = {"eval_examples": 4, "n_samples": 0, "lr": 1e-3, "save_every": 1}


def _run(tmp_path, model, name, **kw):
    return train(DPOConfig(**run_settings(tmp_path, model, name, **{**FAST, **kw})),
                 progress=False)


def _train_records(run):
    return records(run, "train")


def test_simpo_loads_no_reference_and_uses_mean_logps(tmp_path, tiny_model_dir, capfd):
    run = _run(tmp_path, tiny_model_dir, "simpo", loss="simpo", beta=2.0, simpo_gamma=0.5,
               max_steps=1)
    assert "reference log-probs" not in capfd.readouterr().err
    first = _train_records(run)[0]
    # Rewards are beta x the mean per-token log-probs (no reference); both are pair means.
    assert first["rewards/chosen"] == pytest.approx(2.0 * first["logps/chosen"], rel=1e-6)
    assert -12 < first["logps/chosen"] < 0  # a per-token mean, not a sum over ~30 tokens
    # At initialisation the margin of the means is small, so the loss is near -log s(-gamma).
    assert first["loss"] == pytest.approx(-math.log(1 / (1 + math.exp(0.5))), abs=0.5)


def test_bco_pair_state_survives_resume_and_rpo_logs_nll(tmp_path, tiny_model_dir):
    kw = {"loss": "bco_pair", "rpo_alpha": 0.5}
    whole = _train_records(_run(tmp_path, tiny_model_dir, "whole", **kw))
    _run(tmp_path, tiny_model_dir, "part", max_steps=2, **kw)
    resumed = _train_records(_run(tmp_path, tiny_model_dir, "part", resume="true", **kw))
    assert [r["loss"] for r in whole] == [r["loss"] for r in resumed]
    assert all(r["nll"] > 0 for r in whole)
    # step 1: delta = 0 and rewards 0, so each pair costs 2 ln 2 plus the weighted NLL
    assert whole[0]["loss"] == pytest.approx(2 * math.log(2) + 0.5 * whole[0]["nll"], rel=1e-5)


def test_report_to_tensorboard_writes_the_same_metric_names(tmp_path, tiny_model_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _run(tmp_path, tiny_model_dir, "tb", report_to="tensorboard", max_steps=2)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    records = _train_records(run)
    assert {"train/loss", "train/rewards/accuracies", "eval/loss"} <= tags
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]


def test_compiled_blocks_train_like_eager_ones(tmp_path, tiny_model_dir):
    import torch._dynamo

    eager = _train_records(_run(tmp_path, tiny_model_dir, "eager", max_steps=2,
                                micro_batch_size=4, eval_examples=0))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    # segment attention and activation checkpointing on (the defaults); two steps of
    # different lengths: the second recompiles with a dynamic sequence length
    compiled = _train_records(_run(tmp_path, tiny_model_dir, "compiled", max_steps=2,
                                   micro_batch_size=4, eval_examples=0, compile=True))
    assert counters["stats"]["unique_graphs"] >= 2  # norm and MLP graphs really ran compiled
    assert not counters["graph_break"], dict(counters["graph_break"])
    for step in range(2):
        for key in ("loss", "grad_norm", "logps/chosen"):
            assert compiled[step][key] == pytest.approx(eager[step][key], rel=1e-5), key
