"""The losses beyond DPO: golden values by hand in float64, gradient signs, weighted sums and
f-divergence scores (pure functions; the model-level checks are in test_losses_objective)."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import (
    LOSSES,
    PreferenceLoss,
    divergence_scores,
    dpo_loss,
    preference_loss,
    rpo_nll,
)

BETA = 0.5
RC, RR = -2.0, -3.0  # reference log-probs under every point: the losses see only ratios
# (chosen log-ratio, rejected log-ratio): h = 0, h = 1, h = -2.5
POINTS = {"h0": (0.0, 0.0), "h1": (0.5, -0.5), "h-2.5": (-1.0, 1.5)}


def _ls(z: float) -> float:
    """log sigma(z)."""
    return -math.log1p(math.exp(-z))


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# beta = 0.5, so 1 / (2 beta) = 1; eps = 0.1 for EXO, tau = 0.05 for DiscoPOP.
# h0: EXO = log(1/2) - log(0.1 * 0.9) / 2; NCA = 2 log 2; SPPO = 1 + 1; AOT = log 2;
#     APO = 0 (both); DiscoPOP = log(2) / 2 + 1 / 2.
GOLDEN = {
    "exo_pair": (0.5108256237659905, 0.27205483350588544, 1.2829586197138798),
    "nca_pair": (1.3862943611198906, 1.2768788397576871, 1.77955097932761),
    "sppo_hard": (2.0, 0.5, 10.25),  # (c - 1)^2 + (r + 1)^2
    "aot": (0.6931471805599453, 0.4740769841801067, 1.501929081345373),
    "aot_unpaired": (0.6931471805599453, 0.4740769841801067, 1.501929081345373),
    "apo_zero": (0.0, -0.12435300177159614, 0.30163803037724757),
    "apo_down": (0.0, -0.060282830316056524, 0.15484052997283657),
    "discopop": (0.8465735902799727, 0.6065246465980625, 1.501929081372988),
}
OPTIONS = {"exo_pair": {"label_smoothing": 0.1}, "discopop": {"discopop_tau": 0.05}}


def _closed_form(kind: str, c: float, r: float) -> float:
    """The paper's formula for one pair, in plain float arithmetic."""
    z = BETA * (c - r)
    if kind == "exo_pair":
        return (_sig(z) * (_ls(z) - math.log(0.9)) + _sig(-z) * (_ls(-z) - math.log(0.1)))
    if kind == "nca_pair":
        return -_ls(BETA * c) - 0.5 * _ls(-BETA * c) - 0.5 * _ls(-BETA * r)
    if kind == "sppo_hard":
        return (c - 1.0) ** 2 + (r + 1.0) ** 2
    if kind in ("aot", "aot_unpaired"):
        return -_ls(z)
    if kind == "apo_zero":
        return -_sig(BETA * c) + _sig(BETA * r)
    if kind == "apo_down":
        return _sig(BETA * c) - _sig(z)
    m = _sig(z / 0.05)
    return (1 - m) * -_ls(z) + m * math.exp(-z)


def _pair(c: float, r: float, requires_grad: bool = False):
    t = lambda v, g=False: torch.tensor([v], dtype=torch.float64, requires_grad=g)  # noqa: E731
    return t(c + RC, requires_grad), t(r + RR, requires_grad), t(RC), t(RR)


@pytest.mark.parametrize("kind", sorted(GOLDEN))
def test_golden_values_at_three_points(kind):
    for (name, (c, r)), expected in zip(POINTS.items(), GOLDEN[kind], strict=True):
        losses, rc, rr = preference_loss(*_pair(c, r), beta=BETA, kind=kind,
                                         **OPTIONS.get(kind, {}))
        assert losses.dtype == torch.float64
        assert losses.item() == pytest.approx(expected, abs=1e-12), name
        assert losses.item() == pytest.approx(_closed_form(kind, c, r), abs=1e-12), name
        assert rc.item() == pytest.approx(BETA * c) and rr.item() == pytest.approx(BETA * r)


@pytest.mark.parametrize("kind", sorted(GOLDEN) + ["sigmoid_norm"])
def test_gradient_signs(kind):
    # At h = -2.5 the chosen response is the worse one: every loss pushes the chosen
    # likelihood up and the rejected down, except APO-down, which lowers both.
    pc, pr, rc, rr = _pair(*POINTS["h-2.5"], requires_grad=True)
    losses, _, _ = preference_loss(pc, pr, rc, rr, beta=BETA, kind=kind,
                                   **OPTIONS.get(kind, {}))
    losses.sum().backward()
    assert pr.grad.item() > 0
    assert pc.grad.item() > 0 if kind == "apo_down" else pc.grad.item() < 0


def test_discopop_is_not_monotone_near_zero():
    # Its gradient in h is positive at h = 0 (the paper's non-convex region):
    # d/dz at 0 = -m' log 2 - (1 - m) / 2 + m' - m, with m = 1/2, m' = 1 / (4 tau) = 5.
    pc, pr, rc, rr = _pair(0.0, 0.0, requires_grad=True)
    losses, _, _ = preference_loss(pc, pr, rc, rr, beta=BETA, kind="discopop")
    losses.sum().backward()
    expected = BETA * (-5 * math.log(2) - 0.25 + 5 - 0.5)
    assert pc.grad.item() == pytest.approx(expected, rel=1e-12)


def test_exo_needs_a_positive_epsilon():
    with pytest.raises(ValueError, match=r"label_smoothing must be in \(0, 0.5\) with "
                                         r"loss=exo_pair, got 0.0"):
        preference_loss(*_pair(0.0, 0.0), beta=BETA, kind="exo_pair")


def test_aot_sorts_margins_over_the_batch():
    # policy margins [1, -2] and reference margins [0.5, 0] are paired after sorting:
    # (-2 - 0, 1 - 0.5), not pair by pair (1 - 0.5, -2 - 0)
    pc = torch.tensor([0.0, -3.0], dtype=torch.float64)
    pr = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    rc = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    rr = torch.tensor([-1.5, -2.0], dtype=torch.float64)
    losses, _, _ = preference_loss(pc, pr, rc, rr, beta=BETA, kind="aot")
    assert losses.tolist() == pytest.approx([-_ls(BETA * -2.0), -_ls(BETA * 0.5)], abs=1e-12)
    # unpaired: chosen ratios [1, -1] and rejected ratios [0.5, 1] sorted: (-1 - 0.5, 1 - 1)
    losses, _, _ = preference_loss(pc, pr, rc, rr, beta=BETA, kind="aot_unpaired")
    assert losses.tolist() == pytest.approx([-_ls(BETA * -1.5), -_ls(0.0)], abs=1e-12)


def test_sigmoid_norm_is_dpo_on_per_token_means():
    # sums over 2 chosen and 3 rejected tokens: means pc -2, pr -3, rc -1.5, rr -2; h = 0.5
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-4.0, -9.0, -3.0, -6.0))
    counts = torch.tensor([2]), torch.tensor([3])
    loss = PreferenceLoss("sigmoid_norm", beta=BETA, average=False)
    value, _, _ = loss(pc, pr, rc, rr, *counts)
    assert value.item() == pytest.approx(-_ls(BETA * 0.5), abs=1e-12)
    for h in (0.0, 1.0, -2.5):  # on means it is DPO
        means = (torch.tensor([h - 1.0]), torch.tensor([-1.0]), torch.zeros(1), torch.zeros(1))
        norm, _, _ = preference_loss(*means, beta=BETA, kind="sigmoid_norm")
        assert torch.equal(norm, dpo_loss(torch.tensor([h]), BETA))


def test_sft_is_the_chosen_per_token_nll():
    pc, pr = torch.tensor([-1.5], dtype=torch.float64), torch.tensor([-7.0], dtype=torch.float64)
    losses, rc, _ = preference_loss(pc, pr, None, None, beta=BETA, kind="sft")
    assert losses.item() == 1.5 and rc.item() == BETA * -1.5
    # in a weighted sum over summed log-probs it divides by the chosen tokens: RPO's term
    sums = torch.tensor([-6.0, -2.0]), torch.tensor([-3.0, -5.0])
    refs = torch.tensor([-5.0, -2.5]), torch.tensor([-3.5, -4.0])
    tokens = torch.tensor([4, 1]), torch.tensor([2, 5])
    both, _, _ = preference_loss(*sums, *refs, beta=BETA, kind="dpo,sft", weights=(1.0, 0.7),
                                 chosen_tokens=tokens[0], rejected_tokens=tokens[1])
    dpo, _, _ = preference_loss(*sums, *refs, beta=BETA)
    torch.testing.assert_close(both, dpo + 0.7 * rpo_nll(sums[0], tokens[0]), rtol=0, atol=0)
    pc = torch.tensor([-1.5], requires_grad=True)
    preference_loss(pc, pc.detach(), None, None, beta=BETA, kind="sft")[0].sum().backward()
    assert pc.grad.item() == -1.0


def test_weighted_sum_equals_the_weighted_parts():
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(8, generator=g, dtype=torch.float64) * 4 - 10
                      for _ in range(4))
    tokens = torch.randint(1, 9, (8,), generator=g), torch.randint(1, 9, (8,), generator=g)
    loss = PreferenceLoss("dpo,bco_pair,sft", beta=BETA, weights=(0.8, 0.2, 1.0),
                          average=False)
    parts, r_c, r_r = loss.parts(pc, pr, rc, rr, *tokens)
    assert list(parts) == ["dpo", "bco_pair", "sft"]
    total, r_c2, r_r2 = loss(pc, pr, rc, rr, *tokens)
    single = {k: preference_loss(pc, pr, rc, rr, beta=BETA, kind=k)[0]
              for k in ("dpo", "bco_pair")}
    single["sft"] = -pc / tokens[0]
    for k in single:
        torch.testing.assert_close(parts[k], single[k], rtol=0, atol=0)
    torch.testing.assert_close(total, 0.8 * single["dpo"] + 0.2 * single["bco_pair"]
                               + single["sft"], rtol=1e-15, atol=1e-15)
    assert torch.equal(r_c, r_c2) and torch.equal(r_c, BETA * (pc - rc))


@pytest.mark.parametrize("kind, weights, message", [
    ("dpo,kto", None, "unknown loss kind 'kto'"),
    ("dpo,dpo", None, "a loss is listed twice in 'dpo,dpo'"),
    ("dpo,sft", (1.0,), "1 loss weights for 2 losses"),
    ("dpo,sft", (1.0, -1.0), "loss weights must be finite and >= 0"),
])
def test_invalid_combinations(kind, weights, message):
    with pytest.raises(ValueError, match=message):
        PreferenceLoss(kind, weights=weights)


def test_reverse_kl_is_bitwise_the_plain_path():
    g = torch.Generator().manual_seed(4)
    pc, pr, rc, rr = (torch.randn(16, generator=g) * 5 - 20 for _ in range(4))
    for kind, spec in LOSSES.items():
        opts = {"label_smoothing": 0.1} if kind == "exo_pair" else {}
        today = preference_loss(pc, pr, rc, rr, beta=BETA, kind=kind, **opts)[0]
        kl = PreferenceLoss(kind, beta=BETA, divergence="reverse_kl", average=True, **opts)
        assert torch.equal(kl(pc, pr, rc, rr)[0], today), kind
        if spec.inputs == "margin" and spec.needs_reference:  # the margin as it always was
            assert torch.equal(today, spec.fn((pc - pr) - (rc - rr), beta=BETA,
                                              **({"epsilon": 0.1} if opts else {})))


def test_divergence_scores_by_hand():
    u = torch.tensor([0.0, 0.5, -0.5], dtype=torch.float64)
    e = math.exp
    assert divergence_scores(u, "forward_kl").tolist() == pytest.approx(
        [0.0, 1 - e(-0.5), 1 - e(0.5)], abs=1e-15)
    assert divergence_scores(u, "js").tolist() == pytest.approx(
        [0.0, math.log(2 * e(0.5) / (1 + e(0.5))), math.log(2 * e(-0.5) / (1 + e(-0.5)))],
        abs=1e-15)
    assert divergence_scores(u, "alpha", 0.5).tolist() == pytest.approx(
        [0.0, 2 * (1 - e(-0.25)), 2 * (1 - e(0.25))], abs=1e-15)
    # alpha -> 0 is reverse KL
    torch.testing.assert_close(divergence_scores(u, "alpha", 1e-9), u, rtol=1e-8, atol=1e-8)


def test_divergence_applies_to_the_log_ratios_before_the_loss():
    pc, pr, rc, rr = _pair(0.5, -0.5)  # chosen ratio 0.5, rejected -0.5
    at_zero = _pair(0.0, 0.0)
    for divergence, h in [("forward_kl", 2 * math.sinh(0.5)),
                          ("js", _ls(0.5) - _ls(-0.5)),
                          ("alpha", 4 * math.sinh(0.25))]:
        loss = PreferenceLoss("dpo", beta=BETA, divergence=divergence, divergence_alpha=0.5)
        assert loss(pc, pr, rc, rr)[0].item() == pytest.approx(-_ls(BETA * h), abs=1e-12)
        assert loss(*at_zero)[0].item() == pytest.approx(math.log(2), abs=1e-15)
    bco = PreferenceLoss("bco_pair", beta=BETA, divergence="forward_kl")
    s_c, s_r = 1 - math.exp(-0.5), 1 - math.exp(0.5)
    assert bco(pc, pr, rc, rr)[0].item() == pytest.approx(
        -_ls(BETA * s_c) - _ls(-BETA * s_r), abs=1e-12)
    with pytest.raises(ValueError, match=r"divergence_alpha must be in \(0, 1\), got 1.5"):
        PreferenceLoss("dpo", divergence="alpha", divergence_alpha=1.5)
