"""DPOObjective with every registered loss, RPO's NLL term and the BCO reward-mean state."""

from __future__ import annotations

import math
import warnings
from collections import Counter

import pytest
import torch

from preftune.data import collate_pairs
from preftune.fastpath import FastpathFallbackWarning, FastPaths
from preftune.logprobs import concatenated_logps
from preftune.losses import LOSS_KINDS, preference_loss
from preftune.reference import FrozenReference, NoReference, PrecomputedReference
from preftune.step import DPOObjective, finalize

from .conftest import tiny_llama

VOCAB = 64
BETA = 0.5


def _pair(g: torch.Generator, prompt: int, chosen: int, rejected: int) -> dict[str, list[int]]:
    p = torch.randint(1, VOCAB, (prompt,), generator=g).tolist()
    c = torch.randint(1, VOCAB, (chosen,), generator=g).tolist()
    r = torch.randint(1, VOCAB, (rejected,), generator=g).tolist()
    return {"prompt_input_ids": p,
            "chosen_input_ids": p + c, "chosen_labels": [-100] * prompt + c,
            "rejected_input_ids": p + r, "rejected_labels": [-100] * prompt + r}


def _examples(seed: int = 0, n: int = 4) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 5, 2), (2, 2, 7), (4, 6, 6), (1, 3, 1), (5, 1, 4), (2, 8, 3)]
    return [_pair(g, *shapes[(seed + i) % len(shapes)]) for i in range(n)]


@pytest.fixture(scope="module")
def models():
    return tiny_llama(VOCAB, seed=0), tiny_llama(VOCAB, seed=1)


def _live(objective, model):
    """``model`` as a live frozen reference of ``objective``."""
    return FrozenReference(model, objective.sequence_logps)


def _logps(model, batch, average):
    with torch.no_grad():
        return concatenated_logps(model, batch, average=average)


def test_needs_reference_and_length_normalisation():
    eps = {"exo_pair": 1e-3}  # EXO needs label_smoothing > 0
    assert [DPOObjective(kind=k, label_smoothing=eps.get(k, 0.0)).needs_reference
            for k in LOSS_KINDS] == [True, True, True, True, False, True] + [True] * 9 + [False]
    assert not DPOObjective(kind="dpo", reference_free=True).needs_reference
    assert DPOObjective(kind="simpo").average and DPOObjective(kind="simpo", logps="mean").average
    assert not DPOObjective(kind="dpo").average and DPOObjective(logps="mean").average


def test_invalid_objectives():
    with pytest.raises(ValueError, match="unknown loss kind 'kto'"):
        DPOObjective(kind="kto")
    with pytest.raises(ValueError, match="rpo_alpha must be finite and >= 0"):
        DPOObjective(rpo_alpha=-1.0)


@pytest.mark.parametrize("kind", ["dpo", "ipo", "robust", "hinge", "bco_pair"])
@pytest.mark.parametrize("logps", ["sum", "mean"])
def test_reference_based_kinds_match_preference_loss(models, kind, logps):
    policy, reference = models
    batch = collate_pairs(_examples(), 0)
    smoothing = 0.2 if kind == "robust" else 0.0
    objective = DPOObjective(beta=BETA, kind=kind, label_smoothing=smoothing, logps=logps)
    loss, stats = objective(policy, _live(objective, reference), batch, 4.0)
    pol, ref = _logps(policy, batch, logps == "mean"), _logps(reference, batch, logps == "mean")
    expected, r_c, r_r = preference_loss(pol.chosen, pol.rejected, ref.chosen, ref.rejected,
                                         beta=BETA, kind=kind, label_smoothing=smoothing)
    torch.testing.assert_close(loss.detach(), expected.sum() / 4.0)
    assert stats["pairs"] == 4 and stats["loss"] == pytest.approx(expected.sum().item(), rel=1e-5)
    assert stats["rewards/chosen"] == pytest.approx(r_c.sum().item(), rel=1e-5, abs=1e-6)
    assert "nll" not in stats
    # the same numbers from precomputed reference log-probs carried by the batch
    carried = {**batch, "reference_chosen_logps": ref.chosen,
               "reference_rejected_logps": ref.rejected}
    loss2, _ = objective(policy, PrecomputedReference(None), carried, 4.0)
    torch.testing.assert_close(loss2, loss)


def test_simpo_uses_means_and_ignores_the_reference(models):
    policy, reference = models
    batch = collate_pairs(_examples(), 0)
    objective = DPOObjective(beta=2.0, kind="simpo", simpo_gamma=0.3, logps="sum")
    assert not objective.needs_reference
    means = _logps(policy, batch, True)
    torch.testing.assert_close(objective.sequence_logps(policy, batch).chosen, means.chosen)
    loss, stats = objective(policy, NoReference(), batch, 4.0)
    margin = means.chosen - means.rejected
    expected = -torch.nn.functional.logsigmoid(2.0 * margin - 0.3)
    torch.testing.assert_close(loss.detach(), expected.sum() / 4.0)
    assert stats["rewards/chosen"] == pytest.approx(2.0 * means.chosen.sum().item(), rel=1e-5)
    # a reference model or precomputed reference numbers change nothing
    carried = {**batch, "reference_chosen_logps": torch.full((4,), -50.0),
               "reference_rejected_logps": torch.zeros(4)}
    loss2, stats2 = objective(policy, _live(objective, reference), carried, 4.0)
    assert torch.equal(loss2, loss) and stats2 == stats


@pytest.mark.parametrize("logps", ["sum", "mean"])
@pytest.mark.parametrize("kind", ["dpo", "simpo", "bco_pair"])
def test_rpo_adds_the_per_token_nll_of_the_chosen_response(models, logps, kind):
    policy, reference = models
    examples = _examples()
    batch = collate_pairs(examples, 0)
    base = DPOObjective(beta=BETA, kind=kind, logps=logps)
    rpo = DPOObjective(beta=BETA, kind=kind, logps=logps, rpo_alpha=0.7)
    plain_loss, plain_stats = base(policy, _live(base, reference), batch, 4.0)
    loss, stats = rpo(policy, _live(rpo, reference), batch, 4.0)
    # the per-token mean NLL, whatever `logps`: by hand from the summed log-probs and counts
    sums = _logps(policy, batch, False).chosen
    counts = torch.tensor([sum(t != -100 for t in ex["chosen_labels"][1:]) for ex in examples])
    nll = -sums / counts
    assert stats["nll"] == pytest.approx(nll.sum().item(), rel=1e-5)
    assert finalize(stats)["nll"] == pytest.approx(nll.mean().item(), rel=1e-5)
    torch.testing.assert_close(loss.detach(), plain_loss.detach() + 0.7 * nll.sum() / 4.0)
    assert stats["loss"] == pytest.approx(plain_stats["loss"] + 0.7 * nll.sum().item(), rel=1e-5)
    for key in plain_stats:
        if key != "loss":
            assert stats[key] == plain_stats[key], key


def test_rpo_gradient_is_the_nll_gradient(models):
    policy, reference = models
    batch = collate_pairs(_examples(), 0)

    def grads(objective):
        policy.zero_grad()
        objective(policy, _live(objective, reference), batch, 4.0)[0].backward()
        return [p.grad.clone() for p in policy.parameters()]

    base = grads(DPOObjective(beta=BETA))
    rpo = grads(DPOObjective(beta=BETA, rpo_alpha=2.0))
    policy.zero_grad()
    means = concatenated_logps(policy, batch, average=True).chosen
    (-2.0 * means.sum() / 4.0).backward()
    for a, b, p in zip(base, rpo, policy.parameters(), strict=True):
        torch.testing.assert_close(b - a, p.grad, rtol=1e-4, atol=1e-6)
    policy.zero_grad(set_to_none=True)


def test_bco_pair_reward_mean_over_steps(models):
    policy, reference = models
    steps = [collate_pairs(_examples(seed=0), 0), collate_pairs(_examples(seed=3, n=2), 0)]
    objective = DPOObjective(beta=BETA, kind="bco_pair")
    assert objective.state_dict() == {"reward_sum": 0.0, "reward_count": 0.0}
    rewards = []
    for i, batch in enumerate(steps):
        pol, ref = _logps(policy, batch, False), _logps(reference, batch, False)
        r_c, r_r = BETA * (pol.chosen - ref.chosen), BETA * (pol.rejected - ref.rejected)
        # the delta of this step: the mean of every reward of the steps before (0 at first)
        seen = torch.cat(rewards) if rewards else torch.zeros(0)
        delta = seen.double().mean().item() if rewards else 0.0
        assert objective.reward_mean == pytest.approx(delta, rel=1e-6, abs=1e-12)
        loss, stats = objective(policy, _live(objective, reference), batch, float(len(r_c)))
        expected = (-torch.nn.functional.logsigmoid(r_c - delta)
                    - torch.nn.functional.logsigmoid(-(r_r - delta)))
        torch.testing.assert_close(loss.detach(), expected.mean(), rtol=1e-5, atol=1e-6)
        if i == 0:  # evaluation calls the objective without after_step: delta stays put
            objective(policy, _live(objective, reference), batch, 1.0)
            assert objective.reward_mean == 0.0
        objective.after_step(stats)
        rewards += [r_c, r_r]
    everything = torch.cat(rewards).double()
    assert objective.state_dict()["reward_count"] == 12.0
    assert objective.reward_mean == pytest.approx(everything.mean().item(), rel=1e-5)
    assert objective.reward_mean != 0.0

    # checkpoint round trip: a fresh objective continues with the same delta
    saved = objective.state_dict()
    restored = DPOObjective(beta=BETA, kind="bco_pair")
    restored.load_state_dict(saved)
    assert restored.state_dict() == saved and restored.reward_mean == objective.reward_mean
    assert torch.equal(restored(policy, _live(restored, reference), steps[0], 4.0)[0],
                       objective(policy, _live(objective, reference), steps[0], 4.0)[0])
    # the state is not a setting: equal objectives, and copies do not share it
    assert restored == DPOObjective(beta=BETA, kind="bco_pair")
    with pytest.raises(ValueError, match="unexpected objective state 'delta'"):
        restored.load_state_dict({"delta": 1.0})
    # a step with non-finite rewards is left out
    restored.after_step(Counter({"pairs": 4, "rewards/chosen": math.nan,
                                 "rewards/rejected": 0.0}))
    assert restored.state_dict() == saved


def test_bco_pair_micro_batches_sum_to_the_full_batch(models):
    policy, reference = models
    examples = _examples(n=4)
    objective = DPOObjective(beta=BETA, kind="bco_pair")
    objective.load_state_dict({"reward_sum": 0.8, "reward_count": 4.0})  # delta = 0.2

    def run(parts):
        policy.zero_grad()
        total, stats = 0.0, Counter()
        for part in parts:
            batch = collate_pairs(part, 0)
            loss, micro = objective(policy, _live(objective, reference), batch, 4.0)
            loss.backward()
            total += loss.item()
            stats.update(micro)
        return total, stats, [p.grad.clone() for p in policy.parameters()]

    full, full_stats, full_grads = run([examples])
    halves, half_stats, half_grads = run([examples[:2], examples[2:]])
    assert halves == pytest.approx(full, rel=1e-6)
    assert half_stats["pairs"] == full_stats["pairs"] == 4
    assert half_stats["loss"] == pytest.approx(full_stats["loss"], rel=1e-6)
    for a, b in zip(full_grads, half_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    objective.after_step(full_stats)
    other = DPOObjective(beta=BETA, kind="bco_pair")
    other.load_state_dict({"reward_sum": 0.8, "reward_count": 4.0})
    other.after_step(half_stats)
    # equal up to float32 rounding of the forward (the halves are padded differently)
    assert other.reward_mean == pytest.approx(objective.reward_mean, rel=1e-5)
    policy.zero_grad(set_to_none=True)


def test_stateless_losses_have_empty_state(models):
    policy, reference = models
    batch = collate_pairs(_examples(), 0)
    for kind in ("dpo", "ipo", "robust", "hinge", "simpo"):
        objective = DPOObjective(kind=kind)
        _, stats = objective(policy, _live(objective, reference), batch, 4.0)
        objective.after_step(stats)
        assert objective.state_dict() == {}, kind
        objective.load_state_dict({})
    with pytest.raises(ValueError, match="unexpected objective state 'reward_sum'.*none"):
        DPOObjective().load_state_dict({"reward_sum": 1.0})


@pytest.mark.parametrize("kind, logps", [("simpo", "sum"), ("bco_pair", "sum"),
                                         ("robust", "mean"), ("hinge", "sum")])
def test_fast_path_gives_the_same_objective(models, kind, logps):
    policy, reference = models
    batch = collate_pairs(_examples(n=6), 0)
    settings = {"beta": BETA, "kind": kind, "logps": logps, "rpo_alpha": 0.5,
                "label_smoothing": 0.1 if kind == "robust" else 0.0}
    fast = FastPaths(pad_token_id=0, chunked=True, chunk_size=8, share_prompt=True, pack=True)
    plain, fast_obj = DPOObjective(**settings), DPOObjective(**settings, fast=fast)
    for objective in (plain, fast_obj):
        objective.load_state_dict({"reward_sum": 1.0, "reward_count": 8.0}
                                  if kind == "bco_pair" else {})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastpathFallbackWarning)
        loss, stats = fast_obj(policy, _live(fast_obj, reference), batch, 6.0)
    plain_loss, plain_stats = plain(policy, _live(plain, reference), batch, 6.0)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert stats.keys() == plain_stats.keys() and "nll" in stats
    for key, value in plain_stats.items():
        assert stats[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
