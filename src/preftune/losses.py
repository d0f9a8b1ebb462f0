"""Preference losses: pure functions of sequence log-probabilities.

Notation (all per pair): pc, pr are the policy's log-probs of the chosen and rejected
responses, rc, rr the reference's, and h = (pc - pr) - (rc - rr) the log-ratio margin.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

LossKind = Literal["dpo", "ipo"]
LOSS_KINDS: tuple[str, ...] = ("dpo", "ipo")


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 at least; float64 inputs stay float64 (bf16/fp16 are promoted)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def dpo_loss(h: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO loss, Rafailov et al. 2023, Eq. 7: -log sigma(beta * h).

    With label_smoothing eps > 0 this is conservative DPO (labels flipped with probability eps):
    -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h).
    """
    logits = beta * h
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo_loss(h: Tensor, beta: float) -> Tensor:
    """IPO loss, Azar et al. 2023, Eq. 17: (h - 1 / (2 * beta))^2, with beta as the paper's tau."""
    return (h - 1.0 / (2.0 * beta)) ** 2


def _check(
    tensors: dict[str, Tensor | None], beta: float, kind: str, label_smoothing: float
) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; known: {', '.join(LOSS_KINDS)}")
    if kind == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to kind='dpo' only")
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n}={s}" for n, s in shapes.items())
        raise ValueError(f"log-prob tensors must have the same shape, got {listed}")


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float,
    kind: LossKind = "dpo",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference losses and implicit rewards.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each of the inputs' shape.
    ``kind="dpo"`` is DPO (Eq. 7), or conservative DPO when ``label_smoothing > 0``;
    ``kind="ipo"`` is IPO (Eq. 17). With ``reference_free`` the reference terms of h are 0.
    Rewards are beta * (policy - reference), detached, and always measured against the
    reference (which may be None only when reference_free; it then counts as 0).
    """
    if reference_chosen_logps is None or reference_rejected_logps is None:
        if not reference_free:
            raise ValueError("reference log-probs are required unless reference_free=True")
        reference_chosen_logps = torch.zeros_like(policy_chosen_logps)
        reference_rejected_logps = torch.zeros_like(policy_rejected_logps)
    _check(
        {
            "policy_chosen_logps": policy_chosen_logps,
            "policy_rejected_logps": policy_rejected_logps,
            "reference_chosen_logps": reference_chosen_logps,
            "reference_rejected_logps": reference_rejected_logps,
        },
        beta,
        kind,
        label_smoothing,
    )
    dtype = _compute_dtype(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    rc, rr = reference_chosen_logps.to(dtype), reference_rejected_logps.to(dtype)

    h = pc - pr if reference_free else (pc - pr) - (rc - rr)
    losses = dpo_loss(h, beta, label_smoothing) if kind == "dpo" else ipo_loss(h, beta)
    chosen_rewards = (beta * (pc - rc)).detach()
    rejected_rewards = (beta * (pr - rr)).detach()
    return losses, chosen_rewards, rejected_rewards


def reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """Batch means of the implicit rewards, their accuracy (r_w > r_l) and margin (r_w - r_l)."""
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
    }
