"""Objectives for one micro-batch: log-probs -> loss -> summed statistics.

Each objective returns the micro-batch's share of the *global* batch loss (a sum divided by
the global batch's pair or token count), so that backpropagating every micro-batch gives
exactly the gradient of the full batch: gradient accumulation is exact by construction.
Statistics are sums, turned into means once the whole batch (or eval set) is seen.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .fastpath import pair_logps
from .logprobs import IGNORE_INDEX, PairLogps, concatenated_logps, sequence_logps
from .losses import LossKind, preference_loss


@dataclass(frozen=True)
class DPOObjective:
    """The settings that define a preference objective (see ``preference_loss``)."""

    beta: float = 0.1
    kind: LossKind = "dpo"
    label_smoothing: float = 0.0
    reference_free: bool = False
    logps: Literal["sum", "mean"] = "sum"
    # Exact fast paths (preftune.fastpath); None keeps the plain concatenated forward.
    fast: dict | None = None

    def sequence_logps(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> PairLogps:
        """Chosen and rejected log-probs of a collated micro-batch under ``model``."""
        average = self.logps == "mean"
        if self.fast is None:
            return concatenated_logps(model, batch, average=average)
        return pair_logps(model, batch, average=average, **self.fast)

    def __call__(
        self,
        policy: torch.nn.Module,
        reference: torch.nn.Module | None,
        batch: dict[str, Tensor],
        denominator: float,
    ) -> tuple[Tensor, Counter]:
        pol = self.sequence_logps(policy, batch)
        if "reference_chosen_logps" in batch:  # precomputed once (preftune.reference)
            ref_c, ref_r = batch["reference_chosen_logps"], batch["reference_rejected_logps"]
        elif reference is not None:
            with torch.no_grad():
                ref = self.sequence_logps(reference, batch)
            ref_c, ref_r = ref.chosen, ref.rejected
        else:
            ref_c = ref_r = None
        losses, r_c, r_r = preference_loss(
            pol.chosen, pol.rejected, ref_c, ref_r, beta=self.beta, kind=self.kind,
            label_smoothing=self.label_smoothing, reference_free=self.reference_free,
        )
        stats = Counter({
            "pairs": len(losses),
            "loss": losses.detach().sum().item(),
            "rewards/chosen": r_c.sum().item(),
            "rewards/rejected": r_r.sum().item(),
            "rewards/accuracies": (r_c > r_r).sum().item(),
            "rewards/margins": (r_c - r_r).sum().item(),
            "logps/chosen": pol.chosen.detach().sum().item(),
            "logps/rejected": pol.rejected.detach().sum().item(),
            "tokens": int(batch["chosen_attention_mask"].sum())
            + int(batch["rejected_attention_mask"].sum()),
        })
        return losses.sum() / denominator, stats

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
