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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
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
                "the de-biased loss with robust", lambda v: 0.0 <= v < 0.5, "in [0, 0.5)")
register_option("simpo_gamma", 0.5, "SimPO target reward margin",
                lambda v: math.isfinite(v) and v >= 0, "finite and >= 0")
register_option("bco_delta", 0.0, "BCO reward shift: the running mean of past rewards",
                math.isfinite, "finite", config=False)


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
    """

    name: str
    fn: Callable[..., Tensor]
    margin: bool = True
    needs_reference: bool = True
    length_normalized: bool = False
    options: Mapping[str, str] = field(default_factory=dict)
    state: Callable[[], Any] | None = None


LOSSES: dict[str, LossSpec] = {}
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
) -> Callable[[_Fn], _Fn]:
    """Decorator registering a per-pair loss function under ``name`` (see ``LossSpec``).

    ``options`` lists the registered options (``register_option``) the function takes: a
    mapping to the function's own keyword names, or an iterable of names it uses as they are.
    The loss is then ``preftune dpo loss=NAME``, with its options as keys.
    """
    if not isinstance(name, str) or not name:
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
        LOSSES[name] = LossSpec(name, fn, margin=margin, needs_reference=needs_reference,
                                length_normalized=length_normalized,
                                options=MappingProxyType(mapping), state=state)
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


def check_loss(kind: str, beta: float, options: Mapping[str, float]) -> LossSpec:
    """Validate a loss and its options once (config time, or building a ``PreferenceLoss``):
    a known kind, beta > 0, every option registered and valid, and an option set away from its
    default only for a loss that declares it. Returns the loss's spec."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    for name, value in options.items():
        if name not in OPTIONS:
            raise ValueError(f"unknown loss option {name!r}; known: {', '.join(OPTIONS)}")
        if not OPTIONS[name].valid(value):
            raise InvalidOption(OPTIONS[name], value)
    spec = loss_spec(kind)
    for name, value in options.items():
        if name not in spec.options and value != OPTIONS[name].default:
            raise MisplacedOption(name, kind)
    return spec


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


def _apply(
    spec: LossSpec, pc: Tensor, pr: Tensor, rc: Tensor | None, rr: Tensor | None, *,
    beta: float, reference_free: bool, options: Mapping[str, float],
) -> tuple[Tensor, Tensor, Tensor]:
    """The loss of validated settings (see ``preference_loss``); no argument checks."""
    if not spec.needs_reference:
        rc = rr = None
    if rc is None or rr is None:
        if spec.needs_reference and not reference_free:
            raise ValueError("reference log-probs are required unless reference_free=True")
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    _check_shapes({"policy_chosen_logps": pc, "policy_rejected_logps": pr,
                   "reference_chosen_logps": rc, "reference_rejected_logps": rr})
    dtype = _compute_dtype(pc, pr, rc, rr)
    pc, pr, rc, rr = pc.to(dtype), pr.to(dtype), rc.to(dtype), rr.to(dtype)
    free = reference_free or not spec.needs_reference
    kwargs = {spec.options[name]: options[name] for name in spec.options}
    if spec.margin:
        h = pc - pr if free else (pc - pr) - (rc - rr)
        losses = spec.fn(h, beta=beta, **kwargs)
    else:
        chosen, rejected = (pc, pr) if free else (pc - rc, pr - rr)
        losses = spec.fn(chosen, rejected, beta=beta, **kwargs)
    return losses, (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


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
    **options: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference losses and implicit rewards.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each of the inputs' shape.
    ``kind`` is any registered loss (``LOSSES``): ``"dpo"`` is DPO (Eq. 7), or conservative
    DPO when ``label_smoothing > 0``; ``"ipo"`` IPO (Eq. 17); ``"robust"`` robust DPO with flip
    rate ``label_smoothing``; ``"hinge"`` the SLiC hinge loss; ``"simpo"`` SimPO with margin
    ``simpo_gamma`` (expects per-token mean log-probs; reference log-probs are ignored and may
    be None); ``"bco_pair"`` pairwise BCO with reward shift ``bco_delta``. ``options`` are
    further registered options (``register_option``). With ``reference_free`` the reference
    terms of the loss are 0.
    Rewards are beta * (policy - reference), detached, and measured against the reference
    whenever one is given, even when ``reference_free`` (it may be None only then, and
    counts as 0); a loss that needs no reference (simpo) ignores it: rewards beta * policy.
    """
    values = {**{n: o.default for n, o in OPTIONS.items()}, "label_smoothing": label_smoothing,
              "simpo_gamma": simpo_gamma, "bco_delta": bco_delta, **options}
    spec = check_loss(kind, beta, values)
    return _apply(spec, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                  reference_rejected_logps, beta=beta, reference_free=reference_free,
                  options=values)


class PreferenceLoss:
    """A registered loss with its settings, validated once when built, and its state (if the
    loss keeps one, such as bco_pair's running reward mean), checkpointed through
    ``state_dict``. Calling it computes what ``preference_loss`` does, without re-checking."""

    def __init__(self, kind: str = "dpo", *, beta: float = 0.1, reference_free: bool = False,
                 **options: float) -> None:
        values = {n: o.default for n, o in OPTIONS.items()}
        values.update(options)
        self.spec = check_loss(kind, beta, values)
        self.beta, self.reference_free = beta, reference_free
        self.options = {n: float(values[n]) for n in self.spec.options}
        self.state = self.spec.state() if self.spec.state is not None else None

    def __call__(self, pc: Tensor, pr: Tensor, rc: Tensor | None,
                 rr: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        options = {**self.options, **(self.state.inputs() if self.state is not None else {})}
        return _apply(self.spec, pc, pr, rc, rr, beta=self.beta,
                      reference_free=self.reference_free, options=options)

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
                             f"loss {self.spec.name!r} (expected: "
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
