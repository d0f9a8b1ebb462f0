import math
import re

import pytest
import torch

from preftune import losses as losses_mod
from preftune.losses import (
    LOSSES,
    dpo_loss,
    preference_loss,
    register_loss,
    reward_metrics,
    robust_dpo_loss,
    rpo_nll,
)


def _t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def test_dpo_is_ln2_when_policy_equals_reference_for_any_beta():
    logps = _t(-3.0, -10.0, -0.5)
    for beta in (0.01, 0.1, 1.0, 5.0):
        losses, rc, rr = preference_loss(logps, logps - 1, logps, logps - 1, beta=beta)
        assert torch.allclose(losses, torch.full((3,), math.log(2.0)), atol=1e-7)
        assert torch.equal(rc, torch.zeros(3)) and torch.equal(rr, torch.zeros(3))


def test_dpo_hand_derived_value():
    # h = (-1 - -2) - (-1.5 - -1.5) = 1; loss = -log sigma(0.1) = log(1 + e^-0.1)
    losses, rc, rr = preference_loss(_t(-1.0), _t(-2.0), _t(-1.5), _t(-1.5), beta=0.1)
    assert losses.item() == pytest.approx(0.6443966600735709, abs=1e-7)
    assert rc.item() == pytest.approx(0.05) and rr.item() == pytest.approx(-0.05)


def test_conservative_dpo_hand_derived_value():
    # beta * h = 0.5: 0.9 * log(1 + e^-0.5) + 0.1 * log(1 + e^0.5)
    losses, _, _ = preference_loss(_t(0.0), _t(-1.0), _t(0.0), _t(0.0), beta=0.5,
                                   label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.5240769841801067, abs=1e-7)


def test_ipo_hand_derived_values():
    # h = 1, beta = 0.1: (1 - 5)^2 = 16; and zero loss exactly at h = 1 / (2 beta)
    losses, _, _ = preference_loss(_t(-1.0), _t(-2.0), _t(-1.5), _t(-1.5), beta=0.1, kind="ipo")
    assert losses.item() == pytest.approx(16.0)
    losses, _, _ = preference_loss(_t(0.0), _t(-5.0), _t(0.0), _t(0.0), beta=0.1, kind="ipo")
    assert losses.item() == pytest.approx(0.0, abs=1e-10)


def test_reference_free_ignores_reference_in_loss_but_not_in_rewards():
    free, rc, rr = preference_loss(_t(-1.0), _t(-2.0), _t(-7.0), _t(-0.5), beta=0.1,
                                   reference_free=True)
    plain, _, _ = preference_loss(_t(-1.0), _t(-2.0), _t(0.0), _t(0.0), beta=0.1)
    assert torch.equal(free, plain)
    assert rc.item() == pytest.approx(0.6) and rr.item() == pytest.approx(-0.15)
    none, _, _ = preference_loss(_t(-1.0), _t(-2.0), None, None, beta=0.1, reference_free=True)
    assert torch.equal(none, plain)


def test_float64_matches_formulas_exactly():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    beta, eps = 0.3, 0.2
    h = (pc - pr) - (rc - rr)
    sig = lambda x: 1 / (1 + torch.exp(-x))  # noqa: E731
    expected = -(1 - eps) * torch.log(sig(beta * h)) - eps * torch.log(sig(-beta * h))
    losses, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    assert losses.dtype == torch.float64
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    ipo, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, kind="ipo")
    torch.testing.assert_close(ipo, (h - 1 / (2 * beta)) ** 2, rtol=1e-12, atol=1e-12)


def test_low_precision_inputs_computed_in_float32():
    pc = torch.tensor([-20.0, -3.0], dtype=torch.bfloat16)
    pr = torch.tensor([-20.5, -3.5], dtype=torch.bfloat16)
    losses, rc, _ = preference_loss(pc, pr, pc, pr, beta=0.1)
    assert losses.dtype == torch.float32 and rc.dtype == torch.float32
    assert torch.allclose(losses, torch.full((2,), math.log(2.0)))


def test_gradient_signs_push_chosen_up_and_rejected_down():
    for kind in ("dpo", "ipo"):
        pc = torch.tensor([-5.0], requires_grad=True)
        pr = torch.tensor([-5.0], requires_grad=True)
        losses, _, _ = preference_loss(pc, pr, _t(-5.0), _t(-5.0), beta=0.1, kind=kind)
        losses.sum().backward()
        assert pc.grad.item() < 0 < pr.grad.item(), kind
        # DPO at h = 0: dL/dpc = -beta * sigma(0) = -beta / 2
        if kind == "dpo":
            assert pc.grad.item() == pytest.approx(-0.05)


def test_rewards_are_detached():
    pc = torch.tensor([-1.0], requires_grad=True)
    _, rc, rr = preference_loss(pc, _t(-2.0), _t(-1.0), _t(-1.0), beta=0.1)
    assert not rc.requires_grad and not rr.requires_grad


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta": 0.0}, "beta must be > 0"),
        ({"beta": 0.1, "label_smoothing": 0.5}, "label_smoothing must be in [0, 0.5)"),
        ({"beta": 0.1, "label_smoothing": -0.1}, "label_smoothing must be in [0, 0.5)"),
        ({"beta": 0.1, "kind": "kto"}, "unknown loss kind 'kto'"),
        ({"beta": 0.1, "kind": "ipo", "label_smoothing": 0.1}, "kind='dpo' only"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        preference_loss(_t(0.0), _t(0.0), _t(0.0), _t(0.0), **kwargs)


def test_mismatched_shapes_and_missing_reference():
    with pytest.raises(ValueError, match="same shape.*reference_rejected_logps=\\(2,\\)"):
        preference_loss(_t(0.0), _t(0.0), _t(0.0), _t(0.0, 1.0), beta=0.1)
    with pytest.raises(ValueError, match="required unless reference_free"):
        preference_loss(_t(0.0), _t(0.0), None, None, beta=0.1)


def test_reward_metrics():
    m = reward_metrics(_t(1.0, 0.0, 2.0, -1.0), _t(0.0, 1.0, 1.0, -1.0))
    assert m == pytest.approx({"rewards/chosen": 0.5, "rewards/rejected": 0.25,
                               "rewards/accuracies": 0.5, "rewards/margins": 0.25})


# ----------------------------------------------------------------------------- more losses


def test_registry_lists_the_builtin_losses_in_order():
    assert losses_mod.LOSS_KINDS == ("dpo", "ipo", "robust", "hinge", "simpo", "bco_pair",
                                     "exo_pair", "nca_pair", "sppo_hard", "aot", "aot_unpaired",
                                     "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft")
    assert tuple(LOSSES) == losses_mod.LOSS_KINDS
    assert [k for k, s in LOSSES.items() if not s.needs_reference] == ["simpo", "sft"]
    assert [k for k, s in LOSSES.items() if s.length_normalized] == ["simpo", "sigmoid_norm",
                                                                      "sft"]
    assert LOSSES["dpo"].fn is dpo_loss and LOSSES["robust"].fn is robust_dpo_loss


def test_robust_dpo_hand_derived_value():
    # beta * h = 0.5, eps = 0.1: (0.9 * log(1 + e^-0.5) - 0.1 * log(1 + e^0.5)) / 0.8
    losses, rc, rr = preference_loss(_t(0.0), _t(-1.0), _t(0.0), _t(0.0), beta=0.5,
                                     kind="robust", label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.41157698418010663, abs=1e-7)
    assert rc.item() == 0.0 and rr.item() == pytest.approx(-0.5)


def test_robust_dpo_limits_and_unbiasedness():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(32, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    dpo, _, _ = preference_loss(pc, pr, rc, rr, beta=0.3)
    robust, _, _ = preference_loss(pc, pr, rc, rr, beta=0.3, kind="robust")
    assert torch.equal(robust, dpo)  # eps = 0 is DPO, bitwise
    # h = 0: ln 2 for every flip rate (float64: 1 / (1 - 2 eps) amplifies rounding)
    a, b = _t(-2.0, dtype=torch.float64), _t(-3.0, dtype=torch.float64)
    for eps in (0.0, 0.1, 0.3, 0.49):
        at_zero, _, _ = preference_loss(a, b, a, b, beta=0.1, kind="robust", label_smoothing=eps)
        assert at_zero.item() == pytest.approx(math.log(2.0), abs=1e-12)
    # De-biased: averaging over a label flip with probability eps gives the clean DPO loss.
    eps = 0.2
    keep, _, _ = preference_loss(pc, pr, rc, rr, beta=0.3, kind="robust", label_smoothing=eps)
    flip, _, _ = preference_loss(pr, pc, rr, rc, beta=0.3, kind="robust", label_smoothing=eps)
    torch.testing.assert_close((1 - eps) * keep + eps * flip, dpo, rtol=1e-12, atol=1e-12)
    # Unbounded below, unlike conservative DPO: a large margin gives a negative loss.
    big, _, _ = preference_loss(_t(0.0), _t(-100.0), _t(0.0), _t(0.0), beta=1.0, kind="robust",
                                label_smoothing=0.1)
    assert big.item() == pytest.approx(-0.1 * 100 / 0.8, rel=1e-6)


def test_robust_dpo_gradient_at_zero_margin():
    # dL/d(beta h) at h = 0 is -1 / (2 (1 - 2 eps)): with beta 0.1, eps 0.25 dL/dpc = -0.1
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-5.0], requires_grad=True)
    losses, _, _ = preference_loss(pc, pr, _t(-5.0), _t(-5.0), beta=0.1, kind="robust",
                                   label_smoothing=0.25)
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.1) and pr.grad.item() == pytest.approx(0.1)


def test_hinge_hand_derived_values_and_gradient():
    # beta = 0.5; h = 1 -> 0.5, h = -2 -> 2, h = 3 -> 0 (past the margin 1 / beta = 2)
    pc = torch.tensor([-1.0, -4.0, 1.0], requires_grad=True)
    pr = torch.tensor([-2.0, -2.0, -2.0], requires_grad=True)
    losses, rc, _ = preference_loss(pc, pr, _t(0.0, 0.0, 0.0), _t(0.0, 0.0, 0.0), beta=0.5,
                                    kind="hinge")
    assert losses.tolist() == pytest.approx([0.5, 2.0, 0.0])
    losses.sum().backward()
    assert pc.grad.tolist() == pytest.approx([-0.5, -0.5, 0.0])
    assert pr.grad.tolist() == pytest.approx([0.5, 0.5, 0.0])
    # measured against the reference: shifting the reference margin by 1 shifts h by -1
    shifted, _, _ = preference_loss(pc, pr, _t(1.0, 1.0, 1.0), _t(0.0, 0.0, 0.0), beta=0.5,
                                    kind="hinge")
    assert shifted.tolist() == pytest.approx([1.0, 2.5, 0.0])


def test_simpo_hand_derived_value_ignores_reference():
    # mean log-probs -1 and -1.5, beta 2, gamma 0.5: -log sigma(2 * 0.5 - 0.5) = log(1 + e^-0.5)
    pc = torch.tensor([-1.0], requires_grad=True)
    losses, rc, rr = preference_loss(pc, _t(-1.5), None, None, beta=2.0, kind="simpo")
    assert losses.item() == pytest.approx(0.4740769841801067, abs=1e-7)
    # SimPO's implicit rewards: beta * mean log-prob
    assert rc.item() == pytest.approx(-2.0) and rr.item() == pytest.approx(-3.0)
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-2.0 / (1 + math.exp(0.5)))  # -beta sigma(-0.5)
    with_ref, rc2, _ = preference_loss(_t(-1.0), _t(-1.5), _t(-9.0), _t(3.0), beta=2.0,
                                       kind="simpo", simpo_gamma=0.5)
    assert torch.equal(with_ref, losses.detach()) and torch.equal(rc2, rc)
    # gamma = 0 and equal means: ln 2; gamma shifts the logit by -gamma
    even, _, _ = preference_loss(_t(-1.0), _t(-1.0), None, None, beta=2.0, kind="simpo",
                                 simpo_gamma=0.0)
    assert even.item() == pytest.approx(math.log(2.0))
    shifted, _, _ = preference_loss(_t(-1.0), _t(-1.5), None, None, beta=2.0, kind="simpo",
                                    simpo_gamma=1.0)
    assert shifted.item() == pytest.approx(math.log(2.0))


def test_bco_pair_hand_derived_values_and_gradient():
    # log-ratios 2 and -1, beta 0.1: r_w = 0.2, r_l = -0.1
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    losses, rc, rr = preference_loss(pc, pr, _t(-3.0), _t(-1.0), beta=0.1, kind="bco_pair")
    # delta = 0: -log sigma(0.2) - log sigma(0.1)
    assert losses.item() == pytest.approx(1.2425355294551625, abs=1e-7)
    assert rc.item() == pytest.approx(0.2) and rr.item() == pytest.approx(-0.1)
    # delta = 0.05: both terms are -log sigma(0.15)
    losses, _, _ = preference_loss(pc, pr, _t(-3.0), _t(-1.0), beta=0.1, kind="bco_pair",
                                   bco_delta=0.05)
    assert losses.item() == pytest.approx(1.2419140955790642, abs=1e-7)
    losses.sum().backward()
    # dL/dpc = -beta sigma(-(r_w - delta)), dL/dpr = beta sigma(r_l - delta)
    assert pc.grad.item() == pytest.approx(-0.04625701546562505, abs=1e-8)
    assert pr.grad.item() == pytest.approx(0.04625701546562505, abs=1e-8)
    # policy = reference and delta = 0: 2 ln 2
    at_ref, _, _ = preference_loss(_t(-4.0), _t(-7.0), _t(-4.0), _t(-7.0), beta=0.1,
                                   kind="bco_pair")
    assert at_ref.item() == pytest.approx(2 * math.log(2.0))


def test_new_losses_float64_match_formulas():
    g = torch.Generator().manual_seed(2)
    pc, pr, rc, rr = (torch.randn(64, generator=g, dtype=torch.float64) * 10 for _ in range(4))
    beta, eps, gamma, delta = 0.3, 0.2, 0.7, -0.4
    h = (pc - pr) - (rc - rr)
    nls = lambda x: torch.log1p(torch.exp(-x))  # noqa: E731  -log sigma(x), moderate x
    cases = {
        "robust": ({"label_smoothing": eps},
                   ((1 - eps) * nls(beta * h) - eps * nls(-beta * h)) / (1 - 2 * eps)),
        "hinge": ({}, torch.clamp(1 - beta * h, min=0)),
        "simpo": ({"simpo_gamma": gamma}, nls(beta * (pc - pr) - gamma)),
        "bco_pair": ({"bco_delta": delta},
                     nls(beta * (pc - rc) - delta) + nls(-(beta * (pr - rr) - delta))),
    }
    for kind, (kw, expected) in cases.items():
        got, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, kind=kind, **kw)
        assert got.dtype == torch.float64, kind
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=kind)
    # reference_free: the reference terms of the loss are 0
    free, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, kind="bco_pair", bco_delta=delta,
                                 reference_free=True)
    torch.testing.assert_close(free, nls(beta * pc - delta) + nls(-(beta * pr - delta)))


def test_every_kind_pushes_chosen_up_and_rejected_down():
    kwargs = {"robust": {"label_smoothing": 0.2}}
    for kind in ("dpo", "ipo", "robust", "hinge", "simpo", "bco_pair"):
        pc = torch.tensor([-5.0], requires_grad=True)
        pr = torch.tensor([-5.0], requires_grad=True)
        losses, _, _ = preference_loss(pc, pr, _t(-5.0), _t(-5.0), beta=0.1, kind=kind,
                                       **kwargs.get(kind, {}))
        losses.sum().backward()
        assert pc.grad.item() < 0 < pr.grad.item(), kind


def test_low_precision_inputs_for_new_kinds():
    pc = torch.tensor([-2.0, -3.0], dtype=torch.bfloat16)
    pr = torch.tensor([-2.5, -3.5], dtype=torch.bfloat16)
    for kind in ("robust", "hinge", "simpo", "bco_pair"):
        losses, rc, rr = preference_loss(pc, pr, pc, pr, beta=0.1, kind=kind)
        assert losses.dtype == rc.dtype == rr.dtype == torch.float32, kind


def test_rpo_nll_for_sums_and_means():
    # sums -6 over 3 tokens and -3 over 2: per-token NLL 2 and 1.5, like the means -2 and -1.5
    sums, tokens = _t(-6.0, -3.0), torch.tensor([3, 2])
    assert rpo_nll(sums, tokens).tolist() == pytest.approx([2.0, 1.5])
    assert rpo_nll(_t(-2.0, -1.5), None).tolist() == pytest.approx([2.0, 1.5])
    # an empty response counts one token (its log-prob sum is 0), as sequence_logps' mean does
    assert rpo_nll(_t(0.0), torch.tensor([0])).tolist() == [0.0]
    assert rpo_nll(_t(-1.0).bfloat16(), None).dtype == torch.float32
    x = torch.tensor([-6.0], requires_grad=True)
    rpo_nll(x, torch.tensor([3])).sum().backward()
    assert x.grad.item() == pytest.approx(-1 / 3)
    with pytest.raises(ValueError, match="chosen_tokens \\(3,\\) does not match"):
        rpo_nll(sums, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "hinge", "label_smoothing": 0.1},
         "label_smoothing applies to kind='exo_pair' or kind='robust' or kind='dpo' only, "
         "got kind='hinge'"),
        ({"kind": "robust", "label_smoothing": 0.5}, "label_smoothing must be in [0, 0.5)"),
        ({"kind": "dpo", "simpo_gamma": 1.0}, "simpo_gamma applies to kind='simpo' only"),
        ({"kind": "simpo", "simpo_gamma": -0.1}, "simpo_gamma must be finite and >= 0"),
        ({"kind": "ipo", "bco_delta": 0.3}, "bco_delta applies to kind='bco_pair' only"),
        ({"kind": "bco_pair", "bco_delta": math.nan}, "bco_delta must be finite"),
        ({"kind": "SimPO"},
         "unknown loss kind 'SimPO'; known: dpo, ipo, robust, hinge, simpo, bco_pair"),
    ],
)
def test_invalid_arguments_for_new_kinds(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        preference_loss(_t(0.0), _t(0.0), _t(0.0), _t(0.0), beta=0.1, **kwargs)


def test_reference_still_required_for_reference_based_new_kinds():
    for kind in ("robust", "hinge", "bco_pair"):
        with pytest.raises(ValueError, match="required unless reference_free"):
            preference_loss(_t(0.0), _t(0.0), None, None, beta=0.1, kind=kind)


# ----------------------------------------------------------------------------- the registry


@pytest.fixture
def restore_registry():
    saved, kinds = dict(LOSSES), losses_mod.LOSS_KINDS
    yield
    LOSSES.clear()
    LOSSES.update(saved)
    losses_mod.LOSS_KINDS = kinds


def test_registering_a_loss_makes_it_a_kind(restore_registry):
    @register_loss("toy_square", margin=False, options={"bco_delta": "shift"})
    def toy_square(chosen: torch.Tensor, rejected: torch.Tensor, beta: float,
                   shift: float = 0.0) -> torch.Tensor:
        """beta * (rejected log-ratio - chosen log-ratio + shift)^2, for the test only."""
        return beta * (rejected - chosen + shift) ** 2

    assert toy_square.__name__ == "toy_square"  # the decorator returns the function itself
    assert losses_mod.LOSS_KINDS[-1] == "toy_square" and LOSSES["toy_square"].needs_reference
    # log-ratios 2 and -1: 0.5 * (-1 - 2 + 1)^2 = 2
    losses, rc, rr = preference_loss(_t(-1.0), _t(-2.0), _t(-3.0), _t(-1.0), beta=0.5,
                                     kind="toy_square", bco_delta=1.0)
    assert losses.item() == pytest.approx(2.0)
    assert rc.item() == pytest.approx(1.0) and rr.item() == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="simpo_gamma applies to kind='simpo' only"):
        preference_loss(_t(0.0), _t(0.0), _t(0.0), _t(0.0), beta=0.1, kind="toy_square",
                        simpo_gamma=0.1)
    with pytest.raises(ValueError, match="bco_delta applies to kind='toy_square' or "
                                         "kind='bco_pair' only"):
        preference_loss(_t(0.0), _t(0.0), _t(0.0), _t(0.0), beta=0.1, bco_delta=0.1)

    @register_loss("toy_free", needs_reference=False)
    def toy_free(h: torch.Tensor, beta: float) -> torch.Tensor:
        return -beta * h

    free, _, _ = preference_loss(_t(-1.0), _t(-3.0), None, None, beta=0.5, kind="toy_free")
    assert free.item() == pytest.approx(-1.0)


def test_register_loss_rejects_bad_registrations(restore_registry):
    with pytest.raises(ValueError, match="'dpo' is already registered"):
        register_loss("dpo")(dpo_loss)
    with pytest.raises(ValueError, match="unknown loss option\\(s\\) 'tau'; preference_loss "
                                         "passes label_smoothing, simpo_gamma, bco_delta"):
        register_loss("toy", options=("tau",))
    with pytest.raises(ValueError, match="non-empty string"):
        register_loss("")
    assert "toy" not in LOSSES
    assert tuple(LOSSES) == losses_mod.LOSS_KINDS
