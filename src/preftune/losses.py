"""Preference losses: pure functions of sequence log-probabilities, and their registry.

Notation (all per pair): pc, pr are the policy's log-probs of the chosen and rejected
responses, rc, rr the reference's, and h = (pc - pr) - (rc - rr) the log-ratio margin.

Adding a loss means writing one function and registering it with :func:`register_loss`; it
is then a valid ``kind`` of :func:`preference_loss`, of ``preftune.step.DPOObjective`` and of
``preftune dpo loss=NAME``. Its hyperparameters are registered options (:func:`register_option`:
default, meaning, valid values), which become keys of the ``dpo`` stage; the config, the loss
object and ``preference_loss`` validate them through this registry only.
A registered function gets ``beta`` and the options it declares as keywords, and either the
margin h (``margin=True``, the default) or the chosen and rejected log-ratios pc - rc and
pr - rr (``margin=False``). When the reference is not used (``reference_free``, or a loss
registered with ``needs_reference=False``) its terms are 0: h = pc - pr, log-ratios pc, pr.
A loss registered with ``inputs="logps"`` gets pc, pr, rc, rr themselves (AOT's sorted margins,
the chosen NLL). A ``divergence`` other than reverse KL maps each log-ratio to its f-DPO score
before the margin or ratio losses see it (:func:`divergence_scores`). Several losses combine
as a weighted sum (``PreferenceLoss("dpo,sft", weights=(1.0, 0.2))``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LossOption:
    """A hyperparameter that registered losses may declare: its default, meaning and valid
    values, shared by every loss that declares it. ``config`` options are keys of the
    ``dpo`` stage (``preftune dpo NAME=VALUE``, listed in ``--help``); the others are inputs a
    loss's state supplies (bco_pair's running reward mean)."""

    name: str
    default: float
    help: str
    valid: Callable[[float], bool]
    expect: str  # what ``valid`` accepts, for messages: "in [0, 0.5)"
    config: bool = True


OPTIONS: dict[str, LossOption] = {}


def register_option(name: str, default: float, help: str, valid: Callable[[float], bool],
                    expect: str, *, config: bool = True) -> LossOption:
    """Declare a loss hyperparameter (see ``LossOption``); losses then name it in
    ``register_loss(options=...)``."""
    if not name.isidentifier():
        raise ValueError(f"a loss option name must be an identifier, got {name!r}")
    if name in OPTIONS:
        raise ValueError(f"a loss option named {name!r} is already registered")
    OPTIONS[name] = option = LossOption(name, float(default), help, valid, expect, config)
    return option


register_option("label_smoothing", 0.0, "assumed label-flip rate: conservative DPO with dpo, "
                "the de-biased loss with robust, the target's epsilon with exo_pair",
                lambda v: 0.0 <= v < 0.5, "in [0, 0.5)")
register_option("simpo_gamma", 0.5, "SimPO target reward margin",
                lambda v: math.isfinite(v) and v >= 0, "finite and >= 0")
register_option("bco_delta", 0.0, "BCO reward shift: the running mean of past rewards",
                math.isfinite, "finite", config=False)
register_option("discopop_tau", 0.05, "DiscoPOP temperature of the logistic/exponential mix",
                lambda v: math.isfinite(v) and v > 0, "finite and > 0")


class RewardMean:
    """Loss state: the mean of every chosen and rejected reward of the optimizer steps so far
    (0 before the first), supplied to the loss as ``bco_delta`` (BCO's reward shift)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0.0

    def inputs(self) -> dict[str, float]:
        return {"bco_delta": self.total / self.count if self.count else 0.0}

    def update(self, stats: Mapping[str, float]) -> None:
        """Fold one step's summed statistics in; a step whose rewards are not finite is left
        out."""
        total = float(stats["rewards/chosen"]) + float(stats["rewards/rejected"])
        if math.isfinite(total):
            self.total += total
            self.count += 2.0 * float(stats["pairs"])

    def state_dict(self) -> dict[str, float]:
        return {"reward_sum": self.total, "reward_count": self.count}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.total = float(state.get("reward_sum", 0.0))
        self.count = float(state.get("reward_count", 0.0))


@dataclass(frozen=True)
class LossSpec:
    """A registered preference loss.

    ``fn(terms..., beta=beta, **options) -> per-pair losses``: ``terms`` is the margin h when
    ``margin``, else the chosen and rejected log-ratios. ``needs_reference`` is False for a
    loss defined without a reference model (its reference terms are 0 and reference
    log-probs are ignored). ``length_normalized`` means the loss is defined on per-token mean
    log-probs, whatever the ``logps`` setting (``DPOObjective`` then computes means).
    ``options`` maps a registered option (``OPTIONS``) to the keyword of ``fn`` that receives
    it. ``state``, when given, makes the state object a ``PreferenceLoss`` keeps across steps.
    ``inputs`` is what ``fn`` gets: "margin" (h), "ratios" (the two log-ratios) or "logps"
    (pc, pr, rc, rr; no divergence applies). ``limits`` narrows an option's valid values for
    this loss: {name: (valid, expect)}.
    """

    name: str
    fn: Callable[..., Tensor]
    margin: bool = True
    needs_reference: bool = True
    length_normalized: bool = False
    options: Mapping[str, str] = field(default_factory=dict)
    state: Callable[[], Any] | None = None
    inputs: str = "margin"
    limits: Mapping[str, tuple[Callable[[float], bool], str]] = field(default_factory=dict)


LOSSES: dict[str, LossSpec] = {}
INPUTS = ("margin", "ratios", "logps")
# Registered names in registration order; rebound by register_loss (read it as
# ``losses.LOSS_KINDS``, or use ``LOSSES``, to see losses registered after import).
LOSS_KINDS: tuple[str, ...] = ()

_Fn = TypeVar("_Fn", bound=Callable[..., Tensor])


def register_loss(
    name: str,
    *,
    margin: bool = True,
    needs_reference: bool = True,
    length_normalized: bool = False,
    options: Mapping[str, str] | Iterable[str] = (),
    state: Callable[[], Any] | None = None,
    inputs: str | None = None,
    limits: Mapping[str, tuple[Callable[[float], bool], str]] | None = None,
) -> Callable[[_Fn], _Fn]:
    """Decorator registering a per-pair loss function under ``name`` (see ``LossSpec``).

    ``options`` lists the registered options (``register_option``) the function takes: a
    mapping to the function's own keyword names, or an iterable of names it uses as they are.
    The loss is then ``preftune dpo loss=NAME``, with its options as keys. ``inputs``: what
    the function gets ("margin", "ratios" or "logps"; default from ``margin``).
    """
    inputs = inputs or ("margin" if margin else "ratios")
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
    if not isinstance(name, str) or not name or "," in name:
        raise ValueError(f"a loss name must be a non-empty string, got {name!r}")
    if name in LOSSES:
        raise ValueError(f"a loss named {name!r} is already registered")
    mapping = dict(options) if isinstance(options, Mapping) else {o: o for o in options}
    unknown = sorted(set(mapping) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown loss option(s) {', '.join(map(repr, unknown))}; "
                         f"preference_loss passes {', '.join(OPTIONS)} (register_option "
                         "declares more)")

    def decorator(fn: _Fn) -> _Fn:
        global LOSS_KINDS
        if not callable(fn):
            raise TypeError(f"loss {name!r}: {fn!r} is not callable")
        LOSSES[name] = LossSpec(name, fn, margin=inputs == "margin",
                                needs_reference=needs_reference,
                                length_normalized=length_normalized,
                                options=MappingProxyType(mapping), state=state, inputs=inputs,
                                limits=MappingProxyType(dict(limits or {})))
        LOSS_KINDS = tuple(LOSSES)
        return fn

    return decorator


def loss_spec(kind: str) -> LossSpec:
    """The registered spec of ``kind``; ValueError naming the known kinds otherwise."""
    try:
        return LOSSES[kind]
    except (KeyError, TypeError):
        raise UnknownLoss(f"unknown loss kind {kind!r}; known: {', '.join(LOSSES)}") from None


class UnknownLoss(ValueError):
    """A loss name that is not registered."""


class InvalidOption(ValueError):
    """A loss option's value outside what it accepts; ``option`` says what it accepts."""

    def __init__(self, option: LossOption, value: float) -> None:
        super().__init__(f"{option.name} must be {option.expect}, got {value}")
        self.option, self.value = option, value


class MisplacedOption(ValueError):
    """An option set away from its default for a loss that does not declare it; ``users``
    are the losses that do, in registration order."""

    def __init__(self, name: str, kind: str) -> None:
        self.name, self.kind = name, kind
        self.users = [k for k, s in LOSSES.items() if name in s.options]
        # latest registered first, so the original "kind='dpo' only" reads last
        listed = " or ".join(f"kind={k!r}" for k in reversed(self.users)) or "no registered kind"
        super().__init__(f"{name} applies to {listed} only, got kind={kind!r}")


def loss_names(kind: str) -> list[str]:
    """The losses of ``kind``: one name, or several separated by commas (a weighted sum)."""
    return [k.strip() for k in str(kind).split(",")]


def check_losses(kind: str, beta: float, options: Mapping[str, float],
                 weights: Sequence[float] | None = None) -> tuple[LossSpec, ...]:
    """Validate a loss or a weighted sum of losses (``kind`` "dpo,sft") and its options once
    (config time, or building a ``PreferenceLoss``): known kinds, none twice, one finite
    weight >= 0 per loss, beta > 0, every option registered and valid (within a loss's
    ``limits``), and an option set away from its default only for a loss that declares it.
    Returns the losses' specs."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    for name, value in options.items():
        if name not in OPTIONS:
            raise ValueError(f"unknown loss option {name!r}; known: {', '.join(OPTIONS)}")
        if not OPTIONS[name].valid(value):
            raise InvalidOption(OPTIONS[name], value)
    names = loss_names(kind)
    specs = tuple(loss_spec(n) for n in names)
    if len(set(names)) < len(names):
        raise ValueError(f"a loss is listed twice in {kind!r}")
    if weights is not None and len(weights) != len(names):
        raise ValueError(f"{len(weights)} loss weights for {len(names)} losses ({kind})")
    if weights is not None and not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"loss weights must be finite and >= 0, got {list(weights)}")
    if sum(s.state is not None for s in specs) > 1:
        raise ValueError(f"at most one loss with state may be combined, got {kind!r}")
    for name, value in options.items():
        if value != OPTIONS[name].default and not any(name in s.options for s in specs):
            raise MisplacedOption(name, kind)
    for spec in specs:
        for name, (valid, expect) in spec.limits.items():
            if name in options and not valid(options[name]):
                raise InvalidOption(dataclasses.replace(OPTIONS[name], valid=valid,
                                                        expect=expect), options[name])
    return specs


def check_loss(kind: str, beta: float, options: Mapping[str, float]) -> LossSpec:
    """``check_losses`` for one loss; returns its spec."""
    return check_losses(kind, beta, options)[0]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 at least; float64 inputs stay float64 (bf16/fp16 are promoted)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# ----------------------------------------------------------------------------- the losses


@register_loss("dpo", options=("label_smoothing",))
def dpo_loss(h: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO loss, Rafailov et al. 2023, Eq. 7: -log sigma(beta * h).

    With label_smoothing eps > 0 this is conservative DPO (labels flipped with probability eps):
    -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h).
    """
    logits = beta * h
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


@register_loss("ipo")
def ipo_loss(h: Tensor, beta: float) -> Tensor:
    """IPO loss, Azar et al. 2023, Eq. 17: (h - 1 / (2 * beta))^2, with beta as the paper's tau."""
    return (h - 1.0 / (2.0 * beta)) ** 2


@register_loss("robust", options=("label_smoothing",))
def robust_dpo_loss(h: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Robust DPO (rDPO), Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language
    Models with Noisy Feedback" (arXiv:2403.00409), the de-biased loss for a label-flip rate
    eps = label_smoothing < 1/2:

        [(1 - eps) * l(beta * h) - eps * l(-beta * h)] / (1 - 2 * eps),  l(z) = -log sigma(z),

    whose expectation over random flips is the DPO loss on the clean labels. eps = 0 is DPO.
    Unlike conservative DPO it is unbounded below: for large beta * h it falls linearly.
    """
    z = beta * h
    eps = label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


@register_loss("hinge")
def hinge_loss(h: Tensor, beta: float) -> Tensor:
    """Hinge loss: max(0, 1 - beta * h), the rank calibration loss of SLiC-HF, Zhao et al.
    2023 (arXiv:2305.10425), max(0, delta - log p(y_w|x) + log p(y_l|x)), with beta = 1/delta
    and the loss scaled by 1/delta. h is measured against the reference as in DPO; with
    ``reference_free`` it is SLiC's policy-only margin.
    """
    return torch.relu(1.0 - beta * h)


@register_loss("simpo", needs_reference=False, length_normalized=True,
               options={"simpo_gamma": "gamma"})
def simpo_loss(h: Tensor, beta: float, gamma: float = 0.5) -> Tensor:
    """SimPO, Meng et al. 2024, Eq. 6: -log sigma(beta/|y_w| log pi(y_w|x)
    - beta/|y_l| log pi(y_l|x) - gamma).

    Reference-free and length-normalised: h is the difference of the policy's per-token mean
    log-probs of the chosen and rejected responses; gamma is the target reward margin.
    """
    return -F.logsigmoid(beta * h - gamma)


@register_loss("bco_pair", margin=False, options={"bco_delta": "delta"}, state=RewardMean)
def bco_pair_loss(chosen: Tensor, rejected: Tensor, beta: float, delta: float = 0.0) -> Tensor:
    """BCO on pairs, Jung et al. 2024, "Binary Classifier Optimization for Large Language
    Model Alignment" (arXiv:2404.04656): each response is classified on its own,

        -log sigma(r_w - delta) - log sigma(-(r_l - delta)),  r = beta * (log pi - log pi_ref),

    ``chosen`` and ``rejected`` being the log-ratios log pi - log pi_ref. delta, the reward
    shift, is a running mean of past rewards, kept by the caller (``DPOObjective``).
    """
    return -F.logsigmoid(beta * chosen - delta) - F.logsigmoid(-(beta * rejected - delta))


def _exo_epsilon(v: float) -> bool:
    return 0.0 < v < 0.5


@register_loss("exo_pair", options={"label_smoothing": "epsilon"},
               limits={"label_smoothing": (_exo_epsilon, "in (0, 0.5) with loss=exo_pair")})
def exo_pair_loss(h: Tensor, beta: float, epsilon: float = 1e-3) -> Tensor:
    """EXO on pairs, Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model
    Alignment" (arXiv:2402.00856), EXO-pref (Eq. 16) with K = 2: the reverse KL from the
    policy's softmax over the pair, q = (sigma(beta * h), sigma(-beta * h)), to the smoothed
    label distribution p = (1 - eps, eps),

        q_w * (log q_w - log(1 - eps)) + q_l * (log q_l - log eps),

    with eps = label_smoothing, which must be > 0 (at eps = 0 the KL is infinite).
    """
    z = beta * h
    log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
    return (log_qw.exp() * (log_qw - math.log1p(-epsilon))
            + log_ql.exp() * (log_ql - math.log(epsilon)))


@register_loss("nca_pair", margin=False)
def nca_pair_loss(chosen: Tensor, rejected: Tensor, beta: float) -> Tensor:
    """NCA on pairs, Chen et al. 2024, "Noise Contrastive Alignment of Language Models with
    Explicit Rewards" (arXiv:2402.05369), the pairwise NCA loss with r = beta * log-ratio:

        -log sigma(r_w) - 1/2 * log sigma(-r_w) - 1/2 * log sigma(-r_l).

    Unlike DPO it pushes the chosen likelihood itself up, not only the margin.
    """
    r_w, r_l = beta * chosen, beta * rejected
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


@register_loss("sppo_hard", margin=False)
def sppo_hard_loss(chosen: Tensor, rejected: Tensor, beta: float) -> Tensor:
    """SPPO with hard labels, Wu et al. 2024, "Self-Play Preference Optimization for Language
    Model Alignment" (arXiv:2405.00675), Eq. 4.7 with the win probability P set to 1 for the
    chosen and 0 for the rejected response and eta = 1 / beta:

        (log-ratio_w - 1 / (2 * beta))^2 + (log-ratio_l + 1 / (2 * beta))^2.
    """
    half = 0.5 / beta
    return (chosen - half) ** 2 + (rejected + half) ** 2


@register_loss("aot", inputs="logps")
def aot_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float) -> Tensor:
    """AOT (paired), Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via
    Optimal Transport" (arXiv:2406.05882): first-order stochastic dominance of the policy's
    log-likelihood margins pc - pr over the reference's rc - rr, as the logistic loss on the
    one-dimensional optimal transport plan (both sorted over the batch):

        l(beta * (sort(pc - pr)_i - sort(rc - rr)_i)),  l(z) = -log sigma(z).

    The batch is the micro-batch: the value
    depends on how pairs are grouped, so gradient accumulation is not exact for AOT.
    """
    delta = torch.sort(pc - pr).values - torch.sort(rc - rr).values
    return -F.logsigmoid(beta * delta)


@register_loss("aot_unpaired", margin=False)
def aot_unpaired_loss(chosen: Tensor, rejected: Tensor, beta: float) -> Tensor:
    """AOT (unpaired), Melnyk et al. 2024 (arXiv:2406.05882): stochastic dominance of the
    chosen log-ratios over the rejected ones, each sorted over the (micro-)batch:

        l(beta * (sort(log-ratio_w)_i - sort(log-ratio_l)_i)),  l(z) = -log sigma(z).
    """
    delta = torch.sort(chosen).values - torch.sort(rejected).values
    return -F.logsigmoid(beta * delta)


@register_loss("apo_zero", margin=False)
def apo_zero_loss(chosen: Tensor, rejected: Tensor, beta: float) -> Tensor:
    """APO-zero, D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    Revisions" (arXiv:2408.06266), Eq. 7: -sigma(beta * log-ratio_w) + sigma(beta *
    log-ratio_l): the chosen likelihood up and the rejected down, each anchored at the
    reference (for chosen responses better than the model's own). In [-1, 1], 0 at h = 0.
    """
    return -torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)


@register_loss("apo_down", margin=False)
def apo_down_loss(chosen: Tensor, rejected: Tensor, beta: float) -> Tensor:
    """APO-down, D'Oosterlinck et al. 2024 (arXiv:2408.06266), Eq. 8: sigma(beta *
    log-ratio_w) - sigma(beta * (log-ratio_w - log-ratio_l)): both likelihoods down, the
    rejected more (for chosen responses worse than the model's own). In [-1, 1].
    """
    return torch.sigmoid(beta * chosen) - torch.sigmoid(beta * (chosen - rejected))


@register_loss("discopop", options={"discopop_tau": "tau"})
def discopop_loss(h: Tensor, beta: float, tau: float = 0.05) -> Tensor:
    """DiscoPOP, Chan et al. 2024, "Discovering Preference Optimization Algorithms with and for
    Large Language Models" (arXiv:2406.08414), the log-ratio modulated loss (Eq. 5): with
    rho = beta * h and m = sigma(rho / tau),

        (1 - m) * (-log sigma(rho)) + m * exp(-rho).
    """
    rho = beta * h
    mix = torch.sigmoid(rho / tau)
    return (1.0 - mix) * -F.logsigmoid(rho) + mix * torch.exp(-rho)


@register_loss("sigmoid_norm", length_normalized=True)
def sigmoid_norm_loss(h: Tensor, beta: float) -> Tensor:
    """Length-normalised DPO (as in Tulu 3, Lambert et al. 2024, arXiv:2411.15124):
    -log sigma(beta * h) with h made of per-token mean log-probs of policy and reference,
    -log sigma(beta * (log-ratio_w / |y_w| - log-ratio_l / |y_l|)).
    """
    return -F.logsigmoid(beta * h)


@register_loss("sft", inputs="logps", needs_reference=False, length_normalized=True)
def sft_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float) -> Tensor:
    """The per-token mean negative log-likelihood of the chosen response, -log pi(y_w|x) /
    |y_w| (``pc`` is a per-token mean here): RPO's NLL term (``rpo_nll``, Pang et al. 2024)
    as a loss of its own, for weighted sums such as MPO's "dpo,bco_pair,sft". beta is unused.
    """
    return -pc


def rpo_nll(chosen_logps: Tensor, chosen_tokens: Tensor | None) -> Tensor:
    """The NLL term of RPO, Pang et al. 2024, "Iterative Reasoning Preference Optimization"
    (arXiv:2404.19733): -log pi(y_w|x) / |y_w|, the per-token mean negative log-likelihood of
    the chosen response, added as alpha * NLL to a preference loss.

    ``chosen_tokens`` is the number of scored tokens of each chosen response when
    ``chosen_logps`` are sums; pass None when they are already per-token means.
    """
    dtype = _compute_dtype(chosen_logps)
    nll = -chosen_logps.to(dtype)
    if chosen_tokens is None:
        return nll
    if chosen_tokens.shape != chosen_logps.shape:
        raise ValueError(f"chosen_tokens {tuple(chosen_tokens.shape)} does not match "
                         f"chosen_logps {tuple(chosen_logps.shape)}")
    return nll / chosen_tokens.to(device=nll.device, dtype=dtype).clamp(min=1)


# ----------------------------------------------------------------------------- dispatch


def _check_shapes(tensors: dict[str, Tensor]) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n}={s}" for n, s in shapes.items())
        raise ValueError(f"log-prob tensors must have the same shape, got {listed}")


DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")


def divergence_scores(ratio: Tensor, divergence: str, alpha: float = 0.5) -> Tensor:
    """f-DPO, Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference
    Optimization with Diverse Divergence Constraints" (arXiv:2309.16240), Theorem 1 / Table 1:
    with the divergence D_f the implicit reward is beta * f'(pi / pi_ref), so a log-ratio u
    becomes f'(e^u) - f'(1) (shifted so that a policy equal to the reference scores 0):

        reverse_kl  f'(t) = log t + 1         -> u  (DPO)
        forward_kl  f'(t) = -1 / t            -> 1 - e^-u
        js          f'(t) = log(2t / (1 + t)) -> log 2 + log sigma(u)
        alpha       f'(t) = (1 - t^-a) / a    -> (1 - e^(-a u)) / a,  a in (0, 1)

    (alpha -> 0 is reverse KL, alpha = 1 forward KL).
    """
    if divergence == "reverse_kl":
        return ratio
    if divergence == "forward_kl":
        return -torch.expm1(-ratio)
    if divergence == "js":
        return math.log(2.0) + F.logsigmoid(ratio)
    if divergence == "alpha":
        return -torch.expm1(-alpha * ratio) / alpha
    raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")


@dataclass(frozen=True)
class Scores:
    """What a loss reads for one micro-batch (see ``LossSpec.inputs``), in the compute dtype:
    log-probs as sums (``average`` False) or per-token means, with the token counts."""

    pc: Tensor
    pr: Tensor
    rc: Tensor
    rr: Tensor
    free: bool  # no reference terms (rc = rr = 0)
    average: bool
    chosen_tokens: Tensor | None = None
    rejected_tokens: Tensor | None = None

    def means(self) -> Scores:
        """Per-token means of the same log-probs (the reference's divided by the policy's
        counts: the same tokens)."""
        if self.average:
            return self
        if self.chosen_tokens is None or self.rejected_tokens is None:
            raise ValueError("a length-normalised loss on summed log-probs needs token counts")
        nc = self.chosen_tokens.to(device=self.pc.device).clamp(min=1)
        nr = self.rejected_tokens.to(device=self.pr.device).clamp(min=1)
        return dataclasses.replace(self, pc=self.pc / nc, pr=self.pr / nr, rc=self.rc / nc,
                                   rr=self.rr / nr, average=True)


def _terms(spec: LossSpec, x: Scores, divergence: str, alpha: float) -> tuple[Tensor, ...]:
    """The arguments ``spec.fn`` takes before beta and options."""
    if spec.inputs == "logps":
        return x.pc, x.pr, x.rc, x.rr
    free = x.free or not spec.needs_reference
    if divergence == "reverse_kl":
        if spec.inputs == "margin":
            return (x.pc - x.pr if free else (x.pc - x.pr) - (x.rc - x.rr),)
        return (x.pc, x.pr) if free else (x.pc - x.rc, x.pr - x.rr)
    chosen = divergence_scores(x.pc if free else x.pc - x.rc, divergence, alpha)
    rejected = divergence_scores(x.pr if free else x.pr - x.rr, divergence, alpha)
    return (chosen - rejected,) if spec.inputs == "margin" else (chosen, rejected)


def _apply(
    specs: Sequence[LossSpec], weights: Sequence[float] | None, pc: Tensor, pr: Tensor,
    rc: Tensor | None, rr: Tensor | None, *, beta: float, reference_free: bool,
    options: Mapping[str, float], average: bool = False, chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None, divergence: str = "reverse_kl",
    divergence_alpha: float = 0.5,
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Each loss's per-pair values (unweighted) and the rewards, for validated settings (see
    ``preference_loss``); no argument checks. A length-normalised loss gets per-token means
    (computed from sums and counts unless ``average``)."""
    uses_reference = any(s.needs_reference for s in specs)
    if not uses_reference:
        rc = rr = None
    if rc is None or rr is None:
        if uses_reference and not reference_free:
            raise ValueError("reference log-probs are required unless reference_free=True")
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    _check_shapes({"policy_chosen_logps": pc, "policy_rejected_logps": pr,
                   "reference_chosen_logps": rc, "reference_rejected_logps": rr})
    dtype = _compute_dtype(pc, pr, rc, rr)
    pc, pr, rc, rr = pc.to(dtype), pr.to(dtype), rc.to(dtype), rr.to(dtype)
    x = Scores(pc, pr, rc, rr, reference_free or not uses_reference, average,
               chosen_tokens, rejected_tokens)
    parts = {}
    for spec in specs:
        kwargs = {spec.options[name]: options[name] for name in spec.options}
        inputs = x.means() if spec.length_normalized else x
        parts[spec.name] = spec.fn(*_terms(spec, inputs, divergence, divergence_alpha),
                                   beta=beta, **kwargs)
    return parts, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def _weighted(parts: Mapping[str, Tensor], weights: Sequence[float] | None) -> Tensor:
    """The weighted sum of the losses' values (a lone loss with no weight: itself)."""
    values = list(parts.values())
    if weights is None:
        weights = [1.0] * len(values)
    if len(values) == 1 and weights[0] == 1.0:
        return values[0]
    return sum(w * v for w, v in zip(weights, values, strict=True))


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float,
    kind: str = "dpo",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    simpo_gamma: float = 0.5,
    bco_delta: float = 0.0,
    weights: Sequence[float] | None = None,
    divergence: str = "reverse_kl",
    divergence_alpha: float = 0.5,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
    **options: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference losses and implicit rewards.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each of the inputs' shape.
    ``kind`` is any registered loss (``LOSSES``), or several separated by commas, summed with
    ``weights`` (default 1 each): ``"dpo"`` is DPO (Eq. 7), or conservative
    DPO when ``label_smoothing > 0``; ``"ipo"`` IPO (Eq. 17); ``"robust"`` robust DPO with flip
    rate ``label_smoothing``; ``"hinge"`` the SLiC hinge loss; ``"simpo"`` SimPO with margin
    ``simpo_gamma`` (expects per-token mean log-probs; reference log-probs are ignored and may
    be None); ``"bco_pair"`` pairwise BCO with reward shift ``bco_delta``; and the others
    registered in this module. ``options`` are
    further registered options (``register_option``). With ``reference_free`` the reference
    terms of the loss are 0. The log-probs are sums; a length-normalised loss in a weighted
    sum divides them by ``chosen_tokens``/``rejected_tokens``. ``divergence`` maps log-ratios
    to f-DPO scores (``divergence_scores``).
    Rewards are beta * (policy - reference), detached, and measured against the reference
    whenever one is given, even when ``reference_free`` (it may be None only then, and
    counts as 0); a loss that needs no reference (simpo) ignores it: rewards beta * policy.
    """
    values = {**{n: o.default for n, o in OPTIONS.items()}, "label_smoothing": label_smoothing,
              "simpo_gamma": simpo_gamma, "bco_delta": bco_delta, **options}
    specs = check_losses(kind, beta, values, weights)
    parts, r_c, r_r = _apply(
        specs, weights, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, beta=beta, reference_free=reference_free, options=values,
        average=len(specs) == 1 and specs[0].length_normalized, chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens, divergence=divergence,
        divergence_alpha=divergence_alpha)
    return _weighted(parts, weights), r_c, r_r


class PreferenceLoss:
    """A registered loss, or a weighted sum of several (``kind`` "dpo,bco_pair,sft" with
    ``weights``), with its settings, validated once when built, and its state (if a loss
    keeps one, such as bco_pair's running reward mean), checkpointed through ``state_dict``.
    Calling it computes what ``preference_loss`` does, without re-checking; ``parts`` gives
    each loss's unweighted values too. ``average``: the log-probs it is given are per-token
    means (else sums, and a length-normalised loss needs the token counts)."""

    def __init__(self, kind: str = "dpo", *, beta: float = 0.1, reference_free: bool = False,
                 weights: Sequence[float] | None = None, divergence: str = "reverse_kl",
                 divergence_alpha: float = 0.5, average: bool | None = None,
                 **options: float) -> None:
        values = {n: o.default for n, o in OPTIONS.items()}
        values.update(options)
        self.specs = check_losses(kind, beta, values, weights)
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got "
                             f"{divergence!r}")
        if divergence == "alpha" and not 0.0 < divergence_alpha < 1.0:
            raise ValueError(f"divergence_alpha must be in (0, 1), got {divergence_alpha}")
        self.spec = self.specs[0]
        self.weights = tuple(float(w) for w in weights) if weights is not None else None
        self.beta, self.reference_free = beta, reference_free
        self.divergence, self.divergence_alpha = divergence, float(divergence_alpha)
        self.average = (all(s.length_normalized for s in self.specs) if average is None
                        else average)
        self.options = {n: float(values[n]) for s in self.specs for n in s.options}
        stateful = [s.state for s in self.specs if s.state is not None]
        self.state = stateful[0]() if stateful else None

    @property
    def needs_reference(self) -> bool:
        """Whether any of the losses compares with a reference."""
        return any(s.needs_reference for s in self.specs)

    @property
    def length_normalized(self) -> bool:
        """Whether every loss is defined on per-token means."""
        return all(s.length_normalized for s in self.specs)

    def parts(self, pc: Tensor, pr: Tensor, rc: Tensor | None, rr: Tensor | None,
              chosen_tokens: Tensor | None = None, rejected_tokens: Tensor | None = None,
              ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Each loss's unweighted per-pair values, by name, and the rewards."""
        options = {**self.options, **(self.state.inputs() if self.state is not None else {})}
        return _apply(self.specs, self.weights, pc, pr, rc, rr, beta=self.beta,
                      reference_free=self.reference_free, options=options,
                      average=self.average, chosen_tokens=chosen_tokens,
                      rejected_tokens=rejected_tokens, divergence=self.divergence,
                      divergence_alpha=self.divergence_alpha)

    def combine(self, parts: Mapping[str, Tensor]) -> Tensor:
        """The weighted sum of ``parts``' values."""
        return _weighted(parts, self.weights)

    def __call__(self, pc: Tensor, pr: Tensor, rc: Tensor | None, rr: Tensor | None,
                 chosen_tokens: Tensor | None = None, rejected_tokens: Tensor | None = None,
                 ) -> tuple[Tensor, Tensor, Tensor]:
        parts, r_c, r_r = self.parts(pc, pr, rc, rr, chosen_tokens, rejected_tokens)
        return self.combine(parts), r_c, r_r

    def after_step(self, stats: Mapping[str, float]) -> None:
        """Fold one optimizer step's summed statistics (all micro-batches and processes) into
        the state; evaluation does not call it."""
        if self.state is not None:
            self.state.update(stats)

    def state_dict(self) -> dict[str, float]:
        return self.state.state_dict() if self.state is not None else {}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        unknown = sorted(set(state) - set(self.state_dict()))
        if unknown:
            raise ValueError(f"unexpected objective state {', '.join(map(repr, unknown))} for "
                             f"loss {','.join(s.name for s in self.specs)!r} (expected: "
                             f"{', '.join(sorted(self.state_dict())) or 'none'})")
        if self.state is not None:
            self.state.load_state_dict(state)


def reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """Batch means of the implicit rewards, their accuracy (r_w > r_l) and margin (r_w - r_l)."""
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
    }
