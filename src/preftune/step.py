"""Objectives for one micro-batch: log-probs -> loss -> summed statistics.

Each objective returns the micro-batch's share of the *global* batch loss (a sum divided by
the global batch's pair or token count), so that backpropagating every micro-batch gives
exactly the gradient of the full batch: gradient accumulation is exact by construction.
Statistics are sums, turned into means once the whole batch (or eval set) is seen.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from .data.collate import pair_tokens
from .fastpath import FastPaths, batch_logps
from .logprobs import IGNORE_INDEX, PairLogps, sequence_logps
from .losses import LossSpec, PreferenceLoss, rpo_nll
from .reference import Reference

if TYPE_CHECKING:
    from .config import DPOConfig


@dataclass(frozen=True)
class DPOObjective:
    """The settings that define a preference objective (see ``preference_loss``).

    ``kind`` is any registered loss (``preftune.losses.LOSSES``) and ``options`` the values of
    registered options other than ``label_smoothing`` and ``simpo_gamma``; they are checked
    once, here, into ``loss`` (a ``PreferenceLoss``, which also holds the state of stateful
    losses such as bco_pair's running reward mean: every micro-batch of a step uses the value
    from before the step, ``after_step`` folds the step in, evaluation does not call it).
    ``rpo_alpha > 0`` adds RPO's per-token NLL of the chosen response, ``rpo_alpha * nll``, to
    every pair's loss. When ``needs_reference`` is False (``reference_free``, or a loss
    without a reference such as simpo) the reference is not asked, and the rewards are
    beta * the policy's log-probs.
    """

    beta: float = 0.1
    kind: str = "dpo"
    label_smoothing: float = 0.0
    reference_free: bool = False
    logps: Literal["sum", "mean"] = "sum"
    # Exact fast paths (preftune.fastpath.decide_fast_paths); None keeps the plain forward.
    fast: FastPaths | None = None
    simpo_gamma: float = 0.5
    rpo_alpha: float = 0.0
    options: Mapping[str, float] = field(default_factory=dict)
    # A weight per loss of ``kind`` ("dpo,bco_pair,sft"); None = 1 each.
    loss_weights: tuple[float, ...] | None = None
    divergence: str = "reverse_kl"
    divergence_alpha: float = 0.5
    # LD-DPO's weight of the tokens beyond the shorter response's length (None: off).
    ld_alpha: float | None = None
    wpo: bool = False
    # The loss with its checked settings and its state (see state_dict); not a setting.
    loss: PreferenceLoss = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rpo_alpha) and self.rpo_alpha >= 0):
            raise ValueError(f"rpo_alpha must be finite and >= 0, got {self.rpo_alpha}")
        if self.logps not in ("sum", "mean"):
            raise ValueError(f"logps must be 'sum' or 'mean', got {self.logps!r}")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must be in [0, 1], got {self.ld_alpha}")
        loss = PreferenceLoss(self.kind, beta=self.beta, reference_free=self.reference_free,
                              label_smoothing=self.label_smoothing,
                              simpo_gamma=self.simpo_gamma, weights=self.loss_weights,
                              divergence=self.divergence,
                              divergence_alpha=self.divergence_alpha, **self.options)
        loss.average = self.logps == "mean" or loss.length_normalized
        object.__setattr__(self, "loss", loss)

    @classmethod
    def from_config(cls, cfg: DPOConfig, fast: FastPaths | None = None) -> DPOObjective:
        return cls(beta=cfg.beta, kind=cfg.loss, label_smoothing=cfg.label_smoothing,
                   reference_free=cfg.reference_free, logps=cfg.logps, fast=fast,
                   simpo_gamma=cfg.simpo_gamma, rpo_alpha=cfg.rpo_alpha,
                   options=dict(cfg.loss_options),
                   loss_weights=cfg.weights(), divergence=cfg.divergence,
                   divergence_alpha=cfg.divergence_alpha, ld_alpha=cfg.ld_alpha, wpo=cfg.wpo)

    @property
    def spec(self) -> LossSpec:
        return self.loss.spec

    @property
    def needs_reference(self) -> bool:
        """Whether the objective uses a reference model (or precomputed reference log-probs)."""
        return not self.reference_free and self.loss.needs_reference

    @property
    def average(self) -> bool:
        """Whether sequence log-probs are per-token means (``logps=mean``, or the loss is
        length-normalised like simpo; in a weighted sum, every loss) rather than sums."""
        return self.loss.average

    @property
    def reward_mean(self) -> float:
        """bco_pair's reward shift delta: the mean of every chosen and rejected reward of the
        steps so far (0 before the first)."""
        state = self.loss.state
        return state.inputs()["bco_delta"] if state is not None else 0.0

    def state_dict(self) -> dict[str, float]:
        """The loss's state, for checkpoints: {} for stateless losses."""
        return self.loss.state_dict()

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore ``state_dict()`` output; missing keys take their initial value."""
        self.loss.load_state_dict(state)

    def after_step(self, stats: Counter) -> None:
        """Fold one optimizer step's summed statistics into the loss's state (all
        micro-batches, and all processes when distributed: call it on every rank with the
        same sums)."""
        self.loss.after_step(stats)

    def sequence_logps(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> PairLogps:
        """Chosen and rejected log-probs of a micro-batch under ``model``: from ``fast.collate``
        (laid out) or ``collate_pairs`` (padded)."""
        return batch_logps(model, batch, self.fast, average=self.average,
                           ld_alpha=self.ld_alpha)

    def __call__(
        self,
        policy: torch.nn.Module,
        reference: Reference,
        batch: dict[str, Tensor],
        denominator: float,
    ) -> tuple[Tensor, Counter]:
        # The reference first: its no-grad pass is done before the policy's graph exists.
        ref = reference.logps(batch) if self.needs_reference else None
        pol = self.sequence_logps(policy, batch)
        parts, r_c, r_r = self.loss.parts(pol.chosen, pol.rejected, *(ref or (None, None)),
                                          pol.chosen_tokens, pol.rejected_tokens)
        if self.wpo:
            weight = wpo_weights(pol, average=self.average)
            parts = {name: value * weight for name, value in parts.items()}
        losses = self.loss.combine(parts)
        if self.rpo_alpha:
            nll = rpo_nll(pol.chosen, None if self.average else pol.chosen_tokens)
            losses = losses + self.rpo_alpha * nll
        total = losses.sum()
        sums = {
            "loss": total.detach(),
            "rewards/chosen": r_c.sum(),
            "rewards/rejected": r_r.sum(),
            "rewards/accuracies": (r_c > r_r).sum(),
            "rewards/margins": (r_c - r_r).sum(),
            "logps/chosen": pol.chosen.detach().sum(),
            "logps/rejected": pol.rejected.detach().sum(),
            "tokens": pair_tokens(batch),
        }
        if self.rpo_alpha:
            sums["nll"] = nll.detach().sum()
        if len(parts) > 1:  # each loss of a weighted sum, unweighted
            sums.update({f"loss/{name}": value.detach().sum() for name, value in parts.items()})
        if self.wpo:
            sums["wpo_weight"] = weight.sum()
        # One device-to-host copy for all of them (float64 holds float32 sums and counts exactly).
        values = torch.stack([v.double() for v in sums.values()]).tolist()
        stats = Counter({"pairs": len(losses), **dict(zip(sums, values, strict=True))})
        stats["tokens"] = int(stats["tokens"])
        return total / denominator, stats

    @staticmethod
    def denominator(examples: list[dict[str, list[int]]]) -> float:
        """Pairs in the global batch: the loss is a mean over pairs."""
        return float(len(examples))


def wpo_weights(pol: PairLogps, *, average: bool) -> Tensor:
    """WPO's pair weights, Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
    Optimization" (arXiv:2406.11827), Eq. 3: w = exp(mean_t log pi(y_w,t)) * exp(mean_t log
    pi(y_l,t)), the product of both responses' length-normalised policy probabilities,
    detached (a weight, not a path for gradients). ``average``: ``pol`` holds means."""
    chosen, rejected = pol.chosen.detach(), pol.rejected.detach()
    if not average:
        chosen = chosen / pol.chosen_tokens.clamp(min=1)
        rejected = rejected / pol.rejected_tokens.clamp(min=1)
    dtype = torch.promote_types(chosen.dtype, torch.float32)
    return torch.exp(chosen.to(dtype) + rejected.to(dtype))


@dataclass(frozen=True)
class SFTObjective:
    """Next-token loss on the response tokens, averaged per token over the global batch.

    The original DPO code sums per sequence; a per-token mean keeps the loss scale independent
    of response length and batch size, which is the convention of most SFT tooling.
    """

    def __call__(
        self,
        policy: torch.nn.Module,
        reference: Reference,
        batch: dict[str, Tensor],
        denominator: float,
    ) -> tuple[Tensor, Counter]:
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False).logits
        nll = -sequence_logps(logits, batch["labels"])
        stats = Counter({
            "pairs": len(nll),
            "loss": nll.detach().sum().item(),
            "label_tokens": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
            "tokens": int(batch["attention_mask"].sum()),
        })
        return nll.sum() / denominator, stats

    needs_reference = False

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        pass

    def after_step(self, stats: Counter) -> None:
        pass

    @staticmethod
    def denominator(examples: list[dict[str, list[int]]]) -> float:
        """Labelled tokens in the global batch: the loss is a mean over tokens."""
        return float(sum(t != IGNORE_INDEX for ex in examples for t in ex["labels"][1:]))


def finalize(stats: Counter) -> dict[str, float]:
    """Turn summed statistics into the logged means (per pair, or per token for SFT loss)."""
    pairs = max(stats["pairs"], 1)
    out = {}
    for key, value in stats.items():
        if key in ("pairs", "tokens", "label_tokens"):
            continue
        if key == "loss" and "label_tokens" in stats:
            out[key] = value / max(stats["label_tokens"], 1)
        else:
            out[key] = value / pairs
    return out
