"""Per-segment attention equals one masked attention call over the pair layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from preftune import attention
from preftune.attention import Plan, segment_attention
from preftune.data import collate_pairs
from preftune.fastpath import build_layout, pair_logps
from preftune.logprobs import concatenated_logps

from .conftest import tiny_llama

# Two rows of length 12. Row 0: a pair (prefix 3, chosen 2, rejected 4), then an unshared
# sequence of 3 (padding: none). Row 1: a pair without a shared prefix, one whose rejected
# tail is empty (rejected = its prefix), then 2 padding positions.
PLAN = (((0, 3, 2, 4), (9, 3, 0, 0)),
        ((0, 0, 2, 3), (5, 4, 1, 0)))
LENGTH = 12


def _mask(plan, length: int) -> torch.Tensor:
    """The layout's rule, written out: same unit, causal, a rejected tail never sees the
    chosen tail; padding queries see only themselves."""
    mask = torch.zeros(len(plan), length, length, dtype=torch.bool)
    for r, segments in enumerate(plan):
        mask[r] = torch.eye(length, dtype=torch.bool)
        for start, shared, chosen, rejected in segments:
            end = start + shared + chosen + rejected
            causal = torch.ones(end - start, end - start, dtype=torch.bool).tril()
            c0, c1 = start + shared, start + shared + chosen  # the chosen tail
            causal[c1 - start:, c0 - start : c1 - start] = False
            mask[r, start:end, start:end] = causal
    return mask[:, None]


def _pad_rows(plan, length: int) -> torch.Tensor:
    real = torch.zeros(len(plan), length, dtype=torch.bool)
    for r, segments in enumerate(plan):
        start, *sizes = segments[-1]
        real[r, : start + sum(sizes)] = True
    return real


def test_segments_equal_the_masked_call_in_values_and_gradients():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, LENGTH, 8, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    got = segment_attention(q, k, v, PLAN, scale=0.3)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=_mask(PLAN, LENGTH), scale=0.3)
    real = _pad_rows(PLAN, LENGTH)[:, None, :, None]
    torch.testing.assert_close(got * real, want * real, rtol=1e-12, atol=1e-12)
    assert (got[~real.expand_as(got)] == 0).all()  # padding queries: zeros
    weights = torch.randn_like(got) * real
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_grouped_heads_equal_repeated_heads_in_values_and_gradients():
    """With ``gqa`` the key/value heads go to SDPA unrepeated (``enable_gqa``): the same
    attention, and the gradients of the shared heads summed over their query groups."""
    torch.manual_seed(1)
    q = torch.randn(2, 6, LENGTH, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, LENGTH, 8, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    got = segment_attention(q, k, v, PLAN, scale=0.3, gqa=True)
    want = segment_attention(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1),
                             PLAN, scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(got)
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    want_grads = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_layout_segments_describe_the_units():
    ex = {"chosen_input_ids": [1, 2, 3, 10, 11], "chosen_labels": [-100, -100, -100, 10, 11],
          "rejected_input_ids": [1, 2, 3, 20], "rejected_labels": [-100, -100, -100, 20]}
    lay = build_layout([ex, ex], pad_token_id=0, share_prompt=True, pack=True, token_budget=100)
    assert lay.segments == (((0, 3, 2, 1), (6, 3, 2, 1)),)
    assert _mask(lay.segments, 12).equal(lay.attention_mask("sdpa", torch.float32))
    unshared = build_layout([ex], pad_token_id=0, share_prompt=False, pack=True)
    assert unshared.segments == (((0, 5, 0, 0),), ((0, 4, 0, 0),))
    assert build_layout([ex], pad_token_id=0, share_prompt=False, pack=False).segments is None


class _GQA(torch.nn.Module):
    num_key_value_groups = 3


def test_registered_function_takes_grouped_heads_and_passes_other_calls_through():
    attention.install()
    fn = ALL_ATTENTION_FUNCTIONS["sdpa"]
    torch.manual_seed(0)
    q = torch.randn(2, 6, LENGTH, 8)
    k, v = torch.randn(2, 2, LENGTH, 8), torch.randn(2, 2, LENGTH, 8)
    plan = Plan(PLAN)
    got, _ = fn(_GQA(), q, k, v, None, scaling=0.3, **{attention.PLAN_KEY: plan})
    want, _ = sdpa_attention_forward(_GQA(), q, k, v, _mask(PLAN, LENGTH), scaling=0.3)
    real = _pad_rows(PLAN, LENGTH)[:, :, None, None]
    torch.testing.assert_close(got * real, want * real)
    assert plan.calls == 1
    plain, _ = fn(_GQA(), q, k, v, None, scaling=0.3)  # no plan: transformers' own
    torch.testing.assert_close(plain, sdpa_attention_forward(_GQA(), q, k, v, None,
                                                             scaling=0.3)[0])


def test_one_packed_row_and_a_guard_when_the_plan_is_not_used(monkeypatch):
    from .test_fastpath import SMALL_VOCAB, _assert_same, _run

    ex = [{"prompt_input_ids": [5, 6],
           "chosen_input_ids": [5, 6, 7, 8, 9], "chosen_labels": [-100, -100, 7, 8, 9],
           "rejected_input_ids": [5, 6, 4, 3], "rejected_labels": [-100, -100, 4, 3]},
          {"prompt_input_ids": [1],
           "chosen_input_ids": [1, 2, 3], "chosen_labels": [-100, 2, 3],
           "rejected_input_ids": [1, 9, 9, 9, 9, 2], "rejected_labels": [-100, 9, 9, 9, 9, 2]}]
    model = tiny_llama(vocab_size=SMALL_VOCAB)
    want, want_grads = _run(model, lambda: concatenated_logps(model, collate_pairs(ex, 0)))
    got, got_grads = _run(model, lambda: pair_logps(model, ex, pad_token_id=0))
    _assert_same(got, want, got_grads, want_grads)
    # transformers' own sdpa ignores the plan: the values would be wrong, so it is an error
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", sdpa_attention_forward)
    with pytest.raises(RuntimeError, match="did not pass the attention plan"):
        pair_logps(model, ex, pad_token_id=0)


def test_a_single_row_matches_its_row_of_a_batch_and_segments_must_tile():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, LENGTH, 8, dtype=torch.float64) for _ in range(3))
    both = segment_attention(q, k, v, PLAN)
    for r in range(2):  # one row skips the split into rows
        one = segment_attention(q[r : r + 1], k[r : r + 1], v[r : r + 1], PLAN[r : r + 1])
        torch.testing.assert_close(one, both[r : r + 1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="segments must tile their row: one starts at 10, not 9"):
        segment_attention(q[:1], k[:1], v[:1], (((0, 3, 2, 4), (10, 1, 0, 0)),))
