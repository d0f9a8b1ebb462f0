import math

import pytest
import torch

from preftune.losses import preference_loss, reward_metrics


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
