"""Scorers: completions -> one number each, higher is better. One interface, three kinds.

``load_scorer(spec)`` reads a spec once and returns a ``Scorer`` (a callable taking a list of
texts and returning a list of floats of the same length):

- ``vader``: the compound score of VADER (Hutto & Gilbert 2014, the ``vaderSentiment``
  package, whose wheel carries its lexicon: no network), in [-1, 1].
- ``reward_model:PATH``: a Hugging Face sequence-classification folder, run in batches; a
  one-label head gives its logit, a head with more labels the log-odds of its last label
  (for a negative/positive sentiment classifier: of "positive").
- ``python:MODULE:FUNCTION``: a user's function ``f(texts: list[str]) -> list[float]``.

Problems with the spec (unknown kind, missing folder, no such function, a scorer returning the
wrong number or kind of values) are one-line ``ConfigError``s naming the spec.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import ConfigError

Scorer = Callable[[Sequence[str]], list[float]]
KINDS = ("vader", "reward_model:PATH", "python:MODULE:FUNCTION")


def load_scorer(spec: str, *, device: str = "cpu", batch_size: int = 16) -> Scorer:
    """The scorer that ``spec`` names (see the module docstring); every returned score list is
    checked (length, finite floats) before it is handed back."""
    kind, _, rest = spec.partition(":")
    if kind == "vader" and not rest:
        fn = _vader()
    elif kind == "reward_model" and rest:
        fn = _reward_model(rest, device, batch_size)
    elif kind == "python" and rest:
        fn = _python(rest)
    else:
        raise ConfigError(f"scorer: unknown scorer {spec!r}; expected one of {', '.join(KINDS)}")
    return _checked(fn, spec)


def _checked(fn: Callable[[list[str]], Sequence[float]], spec: str) -> Scorer:
    def score(texts: Sequence[str]) -> list[float]:
        texts = list(texts)
        if not texts:
            return []
        try:
            out = fn(texts)
        except ConfigError:
            raise
        except Exception as e:  # a user's function may fail in any way: one line, named
            raise ConfigError(f"scorer {spec!r} failed: {type(e).__name__}: {e}") from None
        values = list(out) if isinstance(out, Sequence) else None
        if values is None or len(values) != len(texts):
            got = f"{len(values)} values" if values is not None else type(out).__name__
            raise ConfigError(f"scorer {spec!r} returned {got} for {len(texts)} texts; expected "
                              "a list of one float per text")
        scores = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ConfigError(f"scorer {spec!r} returned {v!r}; expected finite floats")
            scores.append(float(v))
        return scores

    return score


def _vader() -> Callable[[list[str]], list[float]]:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ConfigError("scorer: vader needs the vaderSentiment package: pip install "
                          "'vaderSentiment>=3.3'") from None
    analyzer = SentimentIntensityAnalyzer()
    return lambda texts: [analyzer.polarity_scores(t)["compound"] for t in texts]


def _reward_model(path: str, device: str, batch_size: int) -> Callable[[list[str]], list[float]]:
    """A sequence-classification model's score of each text, ``batch_size`` texts per forward
    (right-padded; the model reads the score at each row's last real token)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not Path(path).is_dir():
        raise ConfigError(f"scorer: reward_model:{path}: no such folder (expected a local Hugging "
                          "Face sequence-classification model)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"scorer: reward_model:{path}: cannot load ({first[:200]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model.config.pad_token_id is None:  # needed to find each row's last token
        model.config.pad_token_id = tokenizer.pad_token_id

    @torch.no_grad()
    def score(texts: list[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True,
                              truncation=True, max_length=tokenizer.model_max_length
                              if tokenizer.model_max_length < 100_000 else 1024).to(device)
            logits = model(**batch).logits.float()
            if logits.shape[-1] > 1:  # log-odds of the last label against the others
                logits = logits[:, -1:] - torch.logsumexp(logits[:, :-1], dim=-1, keepdim=True)
            out += logits[:, 0].tolist()
        return out

    return score


def _python(target: str) -> Callable[[list[str]], Sequence[float]]:
    module_name, sep, name = target.rpartition(":")
    if not sep or not module_name or not name:
        raise ConfigError(f"scorer: python:{target}: expected python:MODULE:FUNCTION")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module failing as it runs
        raise ConfigError(f"scorer: python:{target}: cannot import {module_name!r} "
                          f"({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"scorer: python:{target}: module {module_name!r} has no function "
                          f"{name!r}")
    return fn
