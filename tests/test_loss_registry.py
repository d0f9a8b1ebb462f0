"""A loss registered in one place is a `preftune dpo` choice, with its option as a key."""

from __future__ import annotations

import math

import pytest
import torch.nn.functional as F

from preftune import losses
from preftune.cli import main

from .conftest import HH_HELPFUL, TINY_RUN, records


@pytest.fixture
def margin_loss(monkeypatch):
    """Registers the loss ``margin_dpo`` with the option ``target_margin`` for one test."""
    monkeypatch.setattr(losses, "LOSS_KINDS", losses.LOSS_KINDS)  # restored afterwards
    losses.register_option("target_margin", 0.25, "reward margin the pair should exceed",
                           lambda v: v >= 0, ">= 0")

    @losses.register_loss("margin_dpo", options={"target_margin": "margin"})
    def margin_dpo(h, beta, margin=0.25):
        """-log sigma(beta * h - margin)."""
        return -F.logsigmoid(beta * h - margin)

    yield
    del losses.LOSSES["margin_dpo"], losses.OPTIONS["target_margin"]


def test_a_loss_registered_in_a_test_is_a_cli_choice_with_its_option(
        margin_loss, tiny_model_dir, tmp_path, capsys):
    assert main(["dpo", "--help"]) == 0
    text = capsys.readouterr().out
    assert "margin_dpo" in next(line for line in text.splitlines() if line.startswith("  loss "))
    option = next(line for line in text.splitlines() if "target_margin" in line)
    assert "0.25" in option and "reward margin the pair should exceed" in option
    assert "loss=margin_dpo" in option

    out = tmp_path / "run"
    args = [f"{k}={v}" for k, v in {**TINY_RUN, "max_steps": 1, "eval_examples": 2,
                                     "n_samples": 0}.items()]
    assert main(["dpo", f"model={tiny_model_dir}", f"dataset={HH_HELPFUL}",
                 f"output_dir={out}", "loss=margin_dpo", "target_margin=0.75", *args]) == 0
    first = records(out, "eval")[0]  # policy = reference: h = 0, the loss is log(1 + e^0.75)
    assert first["loss"] == pytest.approx(math.log1p(math.exp(0.75)), rel=1e-6)
    assert "target_margin: 0.75" in (out / "config.yaml").read_text()


def test_an_option_of_another_loss_is_refused(margin_loss, capsys):
    assert main(["dpo", "model=m", "dataset=d", "loss=ipo", "target_margin=0.5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "preftune: error: target_margin: only applies to loss=margin_dpo, got loss=ipo")
