"""``train.train_step`` on a tiny model, without the CLI: the update it makes, exact
accumulation, and a non-finite step skipped."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from preftune.config import DPOConfig
from preftune.data import collate_pairs
from preftune.distributed import World
from preftune.logprobs import concatenated_logps
from preftune.reference import PrecomputedReference, attach
from preftune.train import build_objective, make_state, train_step

from .conftest import tiny_llama
from .test_step import VOCAB, _examples

BETA, LR, CLIP = 0.5, 1e-3, 0.05


def _state(policy, micro_batch_size: int = 2):
    cfg = DPOConfig(model="tiny", dataset="pairs.jsonl", beta=BETA, lr=LR, warmup_steps=0,
                    max_grad_norm=CLIP, batch_size=4, micro_batch_size=micro_batch_size,
                    chunked_logps=False, share_prompt=False, pack=False)
    return make_state(cfg, World(), policy, PrecomputedReference(None), build_objective(cfg, 0),
                      pad_id=0, total_steps=10)


def _pairs(reference, n: int = 4) -> list[dict]:
    examples = _examples(n=n)
    with torch.no_grad():
        ref = concatenated_logps(reference, collate_pairs(examples, 0))
    return attach(examples, (ref.chosen, ref.rejected))


def test_one_step_is_the_hand_computed_rmsprop_update():
    policy, reference = tiny_llama(VOCAB).double(), tiny_llama(VOCAB, seed=1).double()
    examples = _pairs(reference)
    start = copy.deepcopy(policy)
    # By hand: Eq. 7 of the DPO paper averaged over the 4 pairs, its gradient clipped to
    # CLIP, then RMSprop's first step p -= lr * g / (sqrt((1 - 0.99) g^2) + 1e-8).
    pol = concatenated_logps(start, collate_pairs(examples, 0))
    # carried reference log-probs are collated as float32
    ref_c = torch.tensor([e["reference_chosen_logps"] for e in examples]).double()
    ref_r = torch.tensor([e["reference_rejected_logps"] for e in examples]).double()
    h = (pol.chosen - ref_c) - (pol.rejected - ref_r)
    loss = -F.logsigmoid(BETA * h).mean()
    loss.backward()
    grads = [p.grad for p in start.parameters()]
    scale = min(1.0, CLIP / (torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g) for g in grads])) + 1e-6).item())
    want = [p - LR * (g * scale) / ((0.01 * (g * scale) ** 2).sqrt() + 1e-8)
            for p, g in zip(start.parameters(), grads, strict=True)]

    state = _state(policy)
    record = train_step(state, examples)
    assert abs(record["loss"] - loss.item()) < 1e-12
    assert record["step"] == 1 and record["lr"] == LR and record["skipped_steps"] == 0
    assert scale < 1.0  # the clip was active
    # Steps are about LR * 10; a gradient near 1e-8 makes RMSprop's ratio sensitive to the
    # last bits of g, hence the absolute tolerance.
    for got, expected in zip(policy.parameters(), want, strict=True):
        torch.testing.assert_close(got.detach(), expected.detach(), rtol=0, atol=1e-8)


def test_accumulated_micro_batches_make_the_full_batch_step():
    reference = tiny_llama(VOCAB, seed=1).double()
    examples = _pairs(reference)
    whole, parts = tiny_llama(VOCAB).double(), tiny_llama(VOCAB).double()
    one = train_step(_state(whole, micro_batch_size=4), examples)
    four = train_step(_state(parts, micro_batch_size=1), examples)
    for key in ("loss", "grad_norm", "rewards/accuracies", "rewards/margins", "tokens"):
        assert abs(one[key] - four[key]) < 1e-12, key
    for a, b in zip(whole.parameters(), parts.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)
    start = tiny_llama(VOCAB).double().parameters()
    assert any(not torch.equal(a, b) for a, b in zip(whole.parameters(), start, strict=True))


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_a_non_finite_step_is_skipped_and_counted():
    policy = tiny_llama(VOCAB).double()
    examples = _pairs(tiny_llama(VOCAB, seed=1).double())
    bad = [dict(examples[0], reference_chosen_logps=float("nan")), *examples[1:]]
    before = copy.deepcopy(policy.state_dict())
    state = _state(policy)
    record = train_step(state, bad)
    assert record["loss"] != record["loss"]  # NaN, logged as such
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert all(p.grad is None for p in policy.parameters())
    assert (state.counters.step, state.counters.skipped_steps, state.counters.nonfinite_run) \
        == (1, 1, 1)
    assert state.scheduler.last_epoch == 1  # the schedule still moves with the step count
    train_step(state, examples)  # a finite step updates and ends the run of bad ones
    assert (state.counters.skipped_steps, state.counters.nonfinite_run) == (1, 0)
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
