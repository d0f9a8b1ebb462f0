"""Fast paths decided once at setup, and micro-batches laid out by the collate step."""

from __future__ import annotations

import dataclasses
import traceback
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from preftune import fastpath
from preftune.data import collate_pairs
from preftune.data.collate import collate_layout
from preftune.fastpath import (
    FastpathFallbackWarning,
    FastPaths,
    batch_logps,
    build_layout,
    decide_fast_paths,
    pair_logps,
)
from preftune.logprobs import concatenated_logps
from preftune.reference import FrozenReference, PrecomputedReference, attach
from preftune.step import DPOObjective

from .conftest import tiny_llama
from .test_fastpath import _assert_same, _run, tiny_mistral
from .test_step import VOCAB, _examples

CHECKS = ("_family_reason", "_chunk_reason", "_layout_reason", "_window_reason")
# The kernel auto picks for these CPU models, so that a decided value equals it
REQUESTED = FastPaths(pad_token_id=0, chunk_size=8, attention_kernel="segment")
# (share_prompt, pack, token_budget): each layout the collate step can build
LAYOUTS = [(False, False, None), (True, False, None), (False, True, 12), (True, True, None),
           (True, True, 20)]


@pytest.fixture
def checks(monkeypatch) -> Counter:
    """Counts the capability checks' calls."""
    calls: Counter = Counter()

    def counting(name, check):
        def counted(*args):
            calls[name] += 1
            return check(*args)
        return counted

    for name in CHECKS:
        monkeypatch.setattr(fastpath, name, counting(name, getattr(fastpath, name)))
    return calls


def test_a_step_runs_the_checks_once_per_model_not_per_micro_batch(checks):
    policy, reference = tiny_llama(VOCAB).train(), tiny_llama(VOCAB, seed=1)
    fast = decide_fast_paths(REQUESTED, [policy, reference, policy], max_length=32)
    assert fast == dataclasses.replace(REQUESTED)  # all supported: nothing changed
    assert checks == {name: 2 for name in CHECKS}  # policy and reference, once each
    objective = DPOObjective(beta=0.5, fast=fast)
    examples = _examples(n=6)
    for i in range(0, 6, 2):  # three micro-batches of one step
        live = FrozenReference(reference, objective.sequence_logps)
        loss, _ = objective(policy, live, fast.collate(examples[i : i + 2]), 6.0)
        loss.backward()
    assert checks == {name: 2 for name in CHECKS}


def test_training_decides_once_for_its_models(checks, tmp_path, tiny_model_dir, monkeypatch):
    """Through ``train``: a live reference, a step of 2 micro-batches and 2 evals, one
    decision over the policy and the reference."""
    from .test_train import _dpo

    monkeypatch.setattr("preftune.train.write_report", lambda out: out / "report")  # no plots
    _dpo(tmp_path, tiny_model_dir, max_steps=1, max_examples=4, precompute_reference=False,
         eval_examples=2, n_samples=0, gradient_checkpointing=False)
    assert checks == {name: 2 for name in CHECKS}


def test_unsupported_models_give_one_warning_with_every_reason():
    policy = tiny_llama(VOCAB, final_logit_softcapping=30.0)
    reference = tiny_mistral(vocab_size=VOCAB, sliding_window=16)
    with pytest.warns(FastpathFallbackWarning) as record:
        fast = decide_fast_paths(REQUESTED, [policy, reference, policy], max_length=32)
    assert fast.fallbacks == (
        "chunked log-probs off (config.final_logit_softcapping=30.0 changes the logits)",
        "prompt sharing/packing off (sliding_window=16 is shorter than a sequence may be "
        "(32 tokens))")
    assert len(record) == 1
    assert str(record[0].message) == f"preftune.fastpath: {'; '.join(fast.fallbacks)}"
    assert not (fast.chunked or fast.share_prompt or fast.pack or fast.segments)
    # all off: the plain padded batch, and the plain forward
    assert fast.collate(_examples()).keys() == collate_pairs(_examples(), 0).keys()


def test_sliding_window_against_max_length_and_mixed_attention():
    """A window as long as the longest allowed sequence is a no-op: no fallback. An eager
    model among sdpa ones turns segment attention off (no warning: a masked row is exact)."""
    sdpa, eager = tiny_mistral(vocab_size=VOCAB, sliding_window=16), tiny_llama(VOCAB)
    eager.config._attn_implementation = "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastpathFallbackWarning)
        assert decide_fast_paths(REQUESTED, [sdpa], max_length=16) == REQUESTED
        mixed = decide_fast_paths(REQUESTED, [sdpa, eager], max_length=16)
    assert mixed == dataclasses.replace(REQUESTED, segments=False) and mixed.row_budget is None
    assert decide_fast_paths(None, [sdpa], 16) is None


def _fields(layout) -> dict:
    return {f.name: getattr(layout, f.name) for f in dataclasses.fields(layout)}


@pytest.mark.parametrize(("share_prompt", "pack", "budget"), LAYOUTS)
def test_collate_builds_the_layout_on_cpu_with_what_the_objective_needs(share_prompt, pack,
                                                                        budget):
    examples = attach(_examples(n=5), (torch.randn(5), torch.randn(5)))
    batch = collate_layout(examples, 0, share_prompt=share_prompt, pack=pack,
                           token_budget=budget)
    want = build_layout(examples, pad_token_id=0, share_prompt=share_prompt, pack=pack,
                        token_budget=budget)
    got = batch["layout"]
    for name, value in _fields(want).items():
        if isinstance(value, torch.Tensor):
            assert getattr(got, name).device.type == "cpu"
            assert torch.equal(getattr(got, name), value), name
        else:
            assert getattr(got, name) == value, name
    padded = collate_pairs(examples, 0)
    tokens = padded["chosen_attention_mask"].sum() + padded["rejected_attention_mask"].sum()
    assert torch.equal(batch["tokens"], tokens)
    for key in ("reference_chosen_logps", "reference_rejected_logps"):
        assert torch.equal(batch[key], padded[key])
    moved = {k: v.to("meta") for k, v in batch.items()}  # every value moves to a device
    assert moved["layout"].source.device.type == "meta" and moved["layout"].n_pairs == 5


@pytest.mark.parametrize("segments", [True, False])
@pytest.mark.parametrize(("share_prompt", "pack", "budget"), LAYOUTS)
def test_laid_out_batch_gives_concatenated_logps(share_prompt, pack, budget, segments):
    """Values and gradients of the plain path, and bitwise those of ``pair_logps``."""
    model = tiny_llama(VOCAB)
    examples = _examples(n=5)
    flags = dict(share_prompt=share_prompt, pack=pack, token_budget=budget, segments=segments)
    fast = decide_fast_paths(dataclasses.replace(REQUESTED, **flags), [model], 32)
    batch = fast.collate(examples)
    want, want_grads = _run(model, lambda: concatenated_logps(model, collate_pairs(examples, 0)))
    got, got_grads = _run(model, lambda: batch_logps(model, batch, fast))
    _assert_same(got, want, got_grads, want_grads)
    same, same_grads = _run(model, lambda: pair_logps(model, examples, **fast.flags()))
    assert all(torch.equal(a, b) for a, b in zip(got, same, strict=True))
    assert all(torch.equal(got_grads[n], same_grads[n]) for n in got_grads)


def test_objective_statistics_match_on_a_laid_out_batch():
    policy, reference = tiny_llama(VOCAB), tiny_llama(VOCAB, seed=1)
    examples = _examples(n=4)
    with torch.no_grad():
        ref = concatenated_logps(reference, collate_pairs(examples, 0))
    examples = attach(examples, (ref.chosen, ref.rejected))
    fast = decide_fast_paths(REQUESTED, [policy], 32)
    cached = PrecomputedReference(None)
    plain_loss, plain = DPOObjective(beta=0.5)(policy, cached, collate_pairs(examples, 0), 4.0)
    loss, stats = DPOObjective(beta=0.5, fast=fast)(policy, cached, fast.collate(examples), 4.0)
    torch.testing.assert_close(loss, plain_loss)
    assert stats.keys() == plain.keys() and stats["tokens"] == plain["tokens"]
    for key, value in plain.items():
        assert stats[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


class _HostSyncs(TorchDispatchMode):
    """Records where each device-to-host read (``.item()``, ``bool(tensor)``, ``.tolist()``
    of a device tensor) comes from: the innermost frame outside torch."""

    def __init__(self):
        super().__init__()
        self.callers: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            torch_dir = str(Path(torch.__file__).parent)
            frames = [f.filename for f in traceback.extract_stack()[:-1]  # less this one
                      if not f.filename.startswith(torch_dir)]
            self.callers.append(frames[-1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("flags", [{}, {"segments": False}, {"share_prompt": False,
                                                             "pack": False}])
def test_a_laid_out_batch_runs_without_checks_or_host_syncs(flags, monkeypatch):
    model = tiny_llama(VOCAB)
    fast = decide_fast_paths(dataclasses.replace(REQUESTED, **flags), [model], 32)
    objective = DPOObjective(fast=fast)
    with _HostSyncs() as syncs:  # control: a padded batch is un-padded on the host
        objective.sequence_logps(model, collate_pairs(_examples(n=5), 0))
    assert any("preftune" in c for c in syncs.callers)
    batch = fast.collate(_examples(n=5))
    for name in CHECKS:
        monkeypatch.setattr(fastpath, name, lambda *a: pytest.fail("a check ran"))
    with _HostSyncs() as syncs:
        out = objective.sequence_logps(model, batch)
        (out.chosen.sum() - out.rejected.sum()).backward()
    # transformers itself reads a 2D padding mask to skip building a causal mask
    assert all(c.endswith("transformers/masking_utils.py") for c in syncs.callers), syncs.callers
