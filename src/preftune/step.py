"""Objectives for one micro-batch: log-probs -> loss -> summed statistics.

Each objective returns the micro-batch's share of the *global* batch loss (a sum divided by
the global batch's pair or token count), so that backpropagating every micro-batch gives
exactly the gradient of the full batch: gradient accumulation is exact by construction.
Statistics are sums, turned into means once the whole batch (or eval set) is seen.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .data.collate import pair_tokens
from .fastpath import FastPaths, batch_logps
from .logprobs import IGNORE_INDEX, PairLogps, sequence_logps
from .losses import LossSpec, loss_spec, preference_loss, rpo_nll


@dataclass(frozen=True)
class DPOObjective:
    """The settings that define a preference objective (see ``preference_loss``).

    ``kind`` is any registered loss (``preftune.losses.LOSSES``). ``rpo_alpha > 0`` adds RPO's
    per-token NLL of the chosen response, ``rpo_alpha * nll``, to every pair's loss. Losses
    that take ``bco_delta`` (bco_pair) keep a running mean of past rewards as ``state``: every
    micro-batch of a step uses the value from before the step, and ``after_step`` (once per
    optimizer step, with the step's summed statistics) folds the step's rewards in; evaluation
    does not call it. When ``needs_reference`` is False (``reference_free``, or a loss without
    a reference such as simpo) a reference model or precomputed reference log-probs passed in
    are ignored, and the rewards are beta * the policy's log-probs.
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
    # Mutable state of stateful losses (see state_dict); not part of the settings.
    state: dict[str, float] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        loss_spec(self.kind)  # unknown kinds fail here, not at the first step
        if not (math.isfinite(self.rpo_alpha) and self.rpo_alpha >= 0):
            raise ValueError(f"rpo_alpha must be finite and >= 0, got {self.rpo_alpha}")
        if self.logps not in ("sum", "mean"):
            raise ValueError(f"logps must be 'sum' or 'mean', got {self.logps!r}")

    @property
    def spec(self) -> LossSpec:
        return loss_spec(self.kind)

    @property
    def needs_reference(self) -> bool:
        """Whether the objective uses a reference model (or precomputed reference log-probs)."""
        return not self.reference_free and self.spec.needs_reference

    @property
    def average(self) -> bool:
        """Whether sequence log-probs are per-token means (``logps=mean``, or the loss is
        length-normalised like simpo) rather than sums."""
        return self.logps == "mean" or self.spec.length_normalized

    @property
    def _tracks_rewards(self) -> bool:
        return "bco_delta" in self.spec.options

    @property
    def reward_mean(self) -> float:
        """Mean of every chosen and rejected reward of the steps so far (0 before the first):
        the bco_pair reward shift delta."""
        count = self.state.get("reward_count", 0.0)
        return self.state.get("reward_sum", 0.0) / count if count else 0.0

    def state_dict(self) -> dict[str, float]:
        """The objective's state, for checkpoints: {} for stateless losses."""
        if not self._tracks_rewards:
            return {}
        return {"reward_sum": float(self.state.get("reward_sum", 0.0)),
                "reward_count": float(self.state.get("reward_count", 0.0))}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore ``state_dict()`` output; missing keys take their initial value."""
        known = set(self.state_dict())
        unknown = sorted(set(state) - known)
        if unknown:
            raise ValueError(f"unexpected objective state {', '.join(map(repr, unknown))} for "
                             f"loss {self.kind!r} (expected: {', '.join(sorted(known)) or 'none'})")
        self.state.clear()
        self.state.update({k: float(v) for k, v in state.items()})

    def after_step(self, stats: Counter) -> None:
        """Fold one optimizer step's summed statistics into the state (all micro-batches, and
        all processes when distributed: call it on every rank with the same sums). A step
        whose reward sums are not finite is left out."""
        if not self._tracks_rewards:
            return
        total = float(stats["rewards/chosen"]) + float(stats["rewards/rejected"])
        if not math.isfinite(total):
            return
        self.state["reward_sum"] = self.state.get("reward_sum", 0.0) + total
        self.state["reward_count"] = self.state.get("reward_count", 0.0) + 2.0 * stats["pairs"]

    def sequence_logps(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> PairLogps:
        """Chosen and rejected log-probs of a micro-batch under ``model``: from ``fast.collate``
        (laid out) or ``collate_pairs`` (padded)."""
        return batch_logps(model, batch, self.fast, average=self.average)

    def __call__(
        self,
        policy: torch.nn.Module,
        reference: torch.nn.Module | None,
        batch: dict[str, Tensor],
        denominator: float,
    ) -> tuple[Tensor, Counter]:
        spec = self.spec
        pol = self.sequence_logps(policy, batch)
        ref_c = ref_r = None
        if self.needs_reference:  # else the reference (model or numbers) is not used
            if "reference_chosen_logps" in batch:  # precomputed once (preftune.reference)
                ref_c, ref_r = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
            elif reference is not None:
                with torch.no_grad():
                    ref = self.sequence_logps(reference, batch)
                ref_c, ref_r = ref.chosen, ref.rejected
        options = {"simpo_gamma": self.simpo_gamma, "bco_delta": self.reward_mean}
        losses, r_c, r_r = preference_loss(
            pol.chosen, pol.rejected, ref_c, ref_r, beta=self.beta, kind=self.kind,
            label_smoothing=self.label_smoothing, reference_free=self.reference_free,
            **{k: v for k, v in options.items() if k in spec.options},
        )
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
        # One device-to-host copy for all of them (float64 holds float32 sums and counts exactly).
        values = torch.stack([v.double() for v in sums.values()]).tolist()
        stats = Counter({"pairs": len(losses), **dict(zip(sums, values, strict=True))})
        stats["tokens"] = int(stats["tokens"])
        return total / denominator, stats

    @staticmethod
    def denominator(examples: list[dict[str, list[int]]]) -> float:
        """Pairs in the global batch: the loss is a mean over pairs."""
        return float(len(examples))


@dataclass(frozen=True)
class SFTObjective:
    """Next-token loss on the response tokens, averaged per token over the global batch.

    The original DPO code sums per sequence; a per-token mean keeps the loss scale independent
    of response length and batch size, which is the convention of most SFT tooling.
    """

    def __call__(
        self,
        policy: torch.nn.Module,
        reference: torch.nn.Module | None,
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
