"""The new losses and options inside DPOObjective and `preftune dpo`: weighted sums with a
metric per loss, LD-DPO and WPO on the plain and fast paths, config-time validation."""

from __future__ import annotations

import warnings

import pytest
import torch

from preftune.cli import main
from preftune.config import ConfigError, DPOConfig, parse_config
from preftune.data import collate_pairs
from preftune.fastpath import FastpathFallbackWarning, FastPaths, batch_logps
from preftune.logprobs import IGNORE_INDEX, ld_token_weights
from preftune.reference import FrozenReference
from preftune.step import DPOObjective, finalize, wpo_weights

from .conftest import HH_HELPFUL, TINY_RUN, records, tiny_llama
from .test_step import _examples

VOCAB = 64
BETA = 0.5
FAST = FastPaths(pad_token_id=0, chunked=True, chunk_size=8, share_prompt=True, pack=True)


@pytest.fixture(scope="module")
def models():
    return tiny_llama(VOCAB, seed=0), tiny_llama(VOCAB, seed=1)


def _run(objective, models, examples, denominator=None):
    policy, reference = models
    batch = (objective.fast.collate(examples) if objective.fast is not None
             else collate_pairs(examples, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastpathFallbackWarning)
        return objective(policy, FrozenReference(reference, objective.sequence_logps), batch,
                         denominator or float(len(examples)))


def test_weighted_sum_logs_each_loss_and_equals_the_weighted_parts(models):
    examples = _examples(n=4)
    mpo = DPOObjective(beta=BETA, kind="dpo,bco_pair,sft", loss_weights=(0.8, 0.2, 1.0))
    loss, stats = _run(mpo, models, examples)
    logged = finalize(stats)
    assert {"loss/dpo", "loss/bco_pair", "loss/sft"} <= logged.keys()
    weighted = 0.8 * logged["loss/dpo"] + 0.2 * logged["loss/bco_pair"] + logged["loss/sft"]
    assert logged["loss"] == pytest.approx(weighted, rel=1e-6)
    assert loss.item() == pytest.approx(logged["loss"], rel=1e-6)
    # each part equals the loss on its own; rewards are reported once
    for kind in ("dpo", "bco_pair"):
        _, alone = _run(DPOObjective(beta=BETA, kind=kind), models, examples)
        assert logged[f"loss/{kind}"] == pytest.approx(finalize(alone)["loss"], rel=1e-6)
        assert alone["rewards/chosen"] == pytest.approx(stats["rewards/chosen"], rel=1e-6)
    _, single = _run(DPOObjective(beta=BETA), models, examples)
    assert not any(k.startswith("loss/") for k in single)  # a lone loss: only "loss"


def test_sft_beside_dpo_gives_rpo_numbers(models):
    examples = _examples(n=4)
    for logps in ("sum", "mean"):
        rpo_loss, rpo = _run(DPOObjective(beta=BETA, rpo_alpha=0.5, logps=logps), models,
                             examples)
        sum_loss, both = _run(DPOObjective(beta=BETA, kind="dpo,sft", loss_weights=(1.0, 0.5),
                                           logps=logps), models, examples)
        assert sum_loss.item() == pytest.approx(rpo_loss.item(), rel=1e-6)
        assert both["loss/sft"] == pytest.approx(rpo["nll"], rel=1e-6)


def test_fast_paths_match_plain_for_sums_ld_and_wpo(models):
    examples = _examples(n=6)
    for settings in ({"kind": "dpo,sigmoid_norm,sft"}, {"ld_alpha": 0.3},
                     {"wpo": True, "kind": "nca_pair"}, {"kind": "aot"}):
        plain_loss, plain = _run(DPOObjective(beta=BETA, **settings), models, examples)
        fast_loss, fast = _run(DPOObjective(beta=BETA, fast=FAST, **settings), models,
                               examples)
        assert fast_loss.item() == pytest.approx(plain_loss.item(), rel=1e-5), settings
        assert fast.keys() == plain.keys()
        for key, value in plain.items():
            assert fast[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (settings, key)


def test_ld_weights_by_hand():
    # chosen 3 scored tokens, rejected 5: the rejected tokens beyond the 3rd get alpha
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, 7, 0, 0, 0],
                           [IGNORE_INDEX, 5, 6, 7, 8, 9, IGNORE_INDEX, IGNORE_INDEX]])
    labels[0, 5:] = IGNORE_INDEX
    weights = ld_token_weights(labels, 1, 0.25)
    assert weights.tolist() == [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0.25, 0.25, 1, 1]]


def test_ld_alpha_one_is_dpo_and_alpha_zero_drops_the_tail(models):
    policy, _ = models
    examples = _examples(n=4)
    for fast in (None, FAST):
        batch = fast.collate(examples) if fast else collate_pairs(examples, 0)
        with torch.no_grad():
            dpo = batch_logps(policy, batch, fast)
            one = batch_logps(policy, batch, fast, ld_alpha=1.0)
            zero = batch_logps(policy, batch, fast, ld_alpha=0.0)
        assert torch.equal(one.chosen, dpo.chosen) and torch.equal(one.rejected, dpo.rejected)
        # alpha = 0: each response scored on its first min(|y_w|, |y_l|) tokens only
        for i, ex in enumerate(examples):
            shared = min(dpo.chosen_tokens[i], dpo.rejected_tokens[i]).item()
            for side, value in (("chosen", zero.chosen[i]), ("rejected", zero.rejected[i])):
                cut = _truncated(ex, side, shared)
                with torch.no_grad():
                    expected = batch_logps(policy, collate_pairs([cut], 0), None)
                got = expected.chosen[0] if side == "chosen" else expected.rejected[0]
                assert value.item() == pytest.approx(got.item(), rel=1e-5, abs=1e-5)
    objective = DPOObjective(beta=BETA, ld_alpha=1.0)
    base = DPOObjective(beta=BETA)
    assert torch.equal(_run(objective, models, examples)[0], _run(base, models, examples)[0])


def _truncated(ex, side, keep):
    """``ex`` with the ``side`` response cut to its first ``keep`` scored tokens (both sides
    the same, so the pair stays valid)."""
    ids, labels = ex[f"{side}_input_ids"], ex[f"{side}_labels"]
    start = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    ids, labels = ids[: start + keep], labels[: start + keep]
    return {**ex, "chosen_input_ids": ids, "chosen_labels": labels,
            "rejected_input_ids": ids, "rejected_labels": labels}


def test_wpo_weights_are_detached(models):
    policy, _ = models
    examples = _examples(n=1)
    batch = collate_pairs(examples, 0)
    wpo = DPOObjective(beta=BETA, wpo=True)
    loss, stats = _run(wpo, models, examples)
    loss.backward()
    grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad(set_to_none=True)
    with torch.no_grad():
        weight = wpo_weights(batch_logps(policy, batch, None), average=False).item()
    assert stats["wpo_weight"] == pytest.approx(weight, rel=1e-6) and 0 < weight < 1
    plain, _ = _run(DPOObjective(beta=BETA), models, examples)
    (plain * weight).backward()  # the weight as a constant: no gradient through it
    for a, p in zip(grads, policy.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-8)
    policy.zero_grad(set_to_none=True)
    pol = batch_logps(policy, batch, None)
    assert pol.chosen.requires_grad and not wpo_weights(pol, average=False).requires_grad


@pytest.mark.parametrize("args, message", [
    (["loss=dpo,sft", "loss_weights=1"], "loss_weights: 1 weights for the 2 losses of "
     "loss=dpo,sft"),
    (["loss=dpo,kto"], "loss: expected one of"),
    (["loss=dpo,dpo"], "loss: a loss is listed twice in 'dpo,dpo'"),
    (["loss_weights=1,x"], "loss_weights: expected comma-separated numbers, got '1,x'"),
    (["loss_weights=-1"], "loss_weights: expected finite numbers >= 0, got '-1'"),
    (["loss=exo_pair"], "label_smoothing: expected a float in (0, 0.5) with loss=exo_pair, "
     "got 0.0"),
    (["divergence=js", "reference_free=true"], "divergence: js scores log-ratios to a "
     "reference; this loss has none (reference_free or loss)"),
    (["divergence=js", "loss=aot"], "divergence: loss=aot does not use log-ratios"),
    (["divergence=alpha", "divergence_alpha=1"], "divergence_alpha: expected a float in "
     "(0, 1), got 1.0"),
    (["divergence_alpha=0.3"], "divergence_alpha: only applies to divergence=alpha"),
    (["ld_alpha=1.5"], "ld_alpha: expected a float in [0, 1], got 1.5"),
    (["ld_alpha=0.5", "logps=mean"], "ld_alpha: LD-DPO reweights summed log-probs; not with "
     "logps=mean"),
    (["ld_alpha=0.5", "loss=simpo"], "ld_alpha: LD-DPO reweights summed log-probs; not with "
     "loss=simpo (per-token means)"),
    (["ld_alpha=0.5", "wpo=true"], "ld_alpha: not with wpo=true"),
    (["sync_reference=soft", "lora=true"], "sync_reference: TR-DPO needs a reference model "
     "of its own"),
    (["sync_reference=hard", "loss=simpo"], "sync_reference: TR-DPO updates a reference; "
     "this loss has none"),
    (["sync_alpha=2"], "sync_alpha: expected a float in [0, 1], got 2"),
])
def test_config_errors_are_one_line(args, message):
    with pytest.raises(ConfigError) as e:
        parse_config(DPOConfig, ["model=m", "dataset=d", *args])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_config_accepts_a_weighted_sum():
    cfg = parse_config(DPOConfig, ["model=m", "dataset=d", "loss=DPO,bco_pair,sft",
                                   "loss_weights=0.8,0.2,1.0"])
    assert cfg.loss == "dpo,bco_pair,sft" and cfg.weights() == (0.8, 0.2, 1.0)
    objective = DPOObjective.from_config(cfg)
    assert objective.loss_weights == (0.8, 0.2, 1.0) and objective.needs_reference


# Every new loss in one run as parts of a weighted sum: each part is logged as loss/NAME and
# compared fast against plain on its own (one run instead of ten).
EVERY_NEW = ("exo_pair,nca_pair,sppo_hard,aot,aot_unpaired,apo_zero,apo_down,discopop,"
             "sigmoid_norm,sft")
NEW_LOSSES = [(EVERY_NEW, ["label_smoothing=0.01", "discopop_tau=0.1"]),
              ("dpo,bco_pair,sft", ["loss_weights=0.8,0.2,1.0"]),
              ("dpo", ["divergence=alpha", "divergence_alpha=0.3", "ld_alpha=0.5"]),
              ("ipo", ["wpo=true", "divergence=js"])]


@pytest.mark.parametrize("loss, extra", NEW_LOSSES,
                         ids=["every-new-loss", "mpo", "alpha-ld", "ipo-wpo-js"])
def test_every_new_loss_runs_with_fast_paths_on_and_off(loss, extra, tiny_model_dir,
                                                          tmp_path):
    settings = {**TINY_RUN, "max_steps": 1, "max_examples": 4, "batch_size": 2,
                "micro_batch_size": 2, "eval_examples": 2, "n_samples": 0,
                "precompute_reference": "false"}
    args = [f"{k}={v}" for k, v in settings.items()]
    runs = {}
    for name, fast in (("fast", "true"), ("plain", "false")):
        out = tmp_path / name
        assert main(["dpo", f"model={tiny_model_dir}", f"dataset={HH_HELPFUL}",
                     f"output_dir={out}", f"loss={loss}", *extra, *args,
                     *[f"{k}={fast}" for k in ("chunked_logps", "share_prompt", "pack")]]) == 0
        runs[name] = records(out)
    assert len(runs["fast"]) == len(runs["plain"]) == 3  # eval, train step, last eval
    for a, b in zip(runs["fast"], runs["plain"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith(("loss", "rewards/", "logps/")) and b[key] is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (a["split"], key)
    if "," in loss:
        assert {f"loss/{n}" for n in loss.split(",")} <= runs["fast"][1].keys()
