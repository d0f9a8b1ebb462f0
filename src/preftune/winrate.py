"""The statistics of a generation eval, as pure functions of scores and log-probs.

- ``win_rate``: how often a policy completion scores above a reference completion of the same
  prompt, ties counted on their own (every policy sample against every reference sample).
- ``mean_interval``: a mean with its 95% interval (normal approximation, mean +- 1.96 standard
  errors).
- ``kl_estimate``: the sequence KL(policy || reference) of the DPO paper's objective (Rafailov
  et al. 2023, Eq. 3: the KL term of the RL objective it solves in closed form), estimated from
  the policy's own samples as the mean summed log-ratio, with its standard error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


def mean_interval(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, standard error and 95% interval ``mean +- 1.96 * stderr`` (normal approximation;
    stderr uses the sample standard deviation). With fewer than two values the spread is
    unknown: stderr and bounds are None."""
    n = len(values)
    if n == 0:
        return {"mean": None, "stderr": None, "low": None, "high": None, "n": 0}
    mean = math.fsum(values) / n
    if n < 2:
        return {"mean": mean, "stderr": None, "low": None, "high": None, "n": 1}
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    se = math.sqrt(var / n)
    return {"mean": mean, "stderr": se, "low": mean - Z95 * se, "high": mean + Z95 * se, "n": n}


def win_rate(policy: Sequence[Sequence[float]],
             reference: Sequence[Sequence[float]]) -> dict[str, float | int | None]:
    """Policy against reference, prompt by prompt: ``policy[i]`` and ``reference[i]`` are the
    scores of the samples for prompt i; each policy sample meets each reference sample of its
    prompt once. Returns the counts (wins, ties, losses, comparisons), their rates, and a 95%
    interval of the win rate over prompts (the prompts are the independent draws)."""
    if len(policy) != len(reference):
        raise ValueError(f"{len(policy)} policy prompts but {len(reference)} reference prompts")
    wins = ties = losses = 0
    per_prompt = []
    for p_scores, r_scores in zip(policy, reference, strict=True):
        w = t = lo = 0
        for p in p_scores:
            for r in r_scores:
                w += p > r
                t += p == r
                lo += p < r
        if w + t + lo:
            per_prompt.append(w / (w + t + lo))
        wins, ties, losses = wins + w, ties + t, losses + lo
    total = wins + ties + losses
    rate = (lambda k: k / total) if total else (lambda k: None)
    interval = mean_interval(per_prompt)
    return {"wins": wins, "ties": ties, "losses": losses, "comparisons": total,
            "win_rate": rate(wins), "tie_rate": rate(ties), "loss_rate": rate(losses),
            "win_rate_low": interval["low"], "win_rate_high": interval["high"]}


def kl_estimate(policy_logps: Sequence[float],
                reference_logps: Sequence[float]) -> dict[str, float | int | None]:
    """KL(pi || pi_ref) = E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)] from samples y of the
    policy: the arguments are each sample's summed log-probability of its sampled tokens under
    the policy and under the reference. Unbiased when the samples are drawn from the policy as
    is (temperature 1, no top-p cut); single samples may be negative, the mean estimates a
    non-negative number. Returns mean, standard error, 95% bounds and n."""
    if len(policy_logps) != len(reference_logps):
        raise ValueError(f"{len(policy_logps)} policy log-probs but {len(reference_logps)} "
                         "reference log-probs")
    return mean_interval([p - r for p, r in zip(policy_logps, reference_logps, strict=True)])
