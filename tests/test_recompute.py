"""Activations kept for backward instead of recomputed (preftune.recompute): same values and
gradients, kept only while the step's gradients do not exist yet."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoTokenizer

from preftune import recompute
from preftune.data import read_pairs, tokenize_pair
from preftune.fastpath import chunked_target_logps, pair_logps
from preftune.models import enable_activation_checkpointing

from .conftest import GPT2_TOKENIZER, HH_HELPFUL, random_head, tiny_llama


@pytest.fixture(scope="module")
def examples():
    tok = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    pairs = list(itertools.islice(read_pairs(HH_HELPFUL, quiet=True), 6))
    return [tokenize_pair(p, tok, max_length=64, max_prompt_length=32) for p in pairs]


def _grads(fn, *tensors):
    out = fn()
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype)).sum().backward()
    return out.detach(), [t.grad.clone() for t in tensors]


def test_kept_chunk_logits_give_identical_values_and_gradients():
    hidden, weight, bias, targets = random_head(8)
    results = {}
    for keep in (0, 7, 11):  # none; the first two chunks of 3 rows; all four chunks
        saved = []

        def pack(t, saved=saved):
            saved.append(tuple(t.shape))
            return t

        for t in (hidden, weight, bias):
            t.grad = None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            results[keep] = _grads(
                lambda k=keep: chunked_target_logps(hidden, weight, bias, targets, 3, k),
                hidden, weight, bias)
        logits = [s for s in saved if s[-1] == 13 and len(s) == 2]
        assert logits == [(3, 13)] * {0: 0, 7: 2, 11: 3}[keep] + ([(2, 13)] if keep == 11 else [])
    for keep in (7, 11):  # the same float operations on the same values
        assert torch.equal(results[keep][0], results[0][0])
        for got, want in zip(results[keep][1], results[0][1], strict=True):
            assert torch.equal(got, want)


def test_kept_logits_refuse_a_second_backward():
    """Backward turns kept logits into their gradient in place: a second backward through the
    same graph must fail loudly, not read gradients as logits."""
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    out = chunked_target_logps(hidden, weight, None, torch.tensor([1, 2, 3, 4]), 2, keep_rows=4)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def _counting(model):
    """Count each decoder block's attention calls (a checkpointed block runs again in backward:
    the block's forward is replayed without its module hooks, its attention with them, and
    the replay stops early, inside the MLP)."""
    calls = [0] * len(model.model.layers)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_keep_last_blocks_skips_their_recompute_and_changes_nothing(examples):
    def run(budget_blocks):
        model = tiny_llama(num_hidden_layers=4).train()
        enable_activation_checkpointing(model)
        calls = _counting(model)
        length = min(len(e["chosen_input_ids"]) for e in examples)
        ids = torch.tensor([e["chosen_input_ids"][:length] for e in examples])
        grads = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
        per_block = recompute.block_bytes_per_token(model) * ids.numel() + grads
        with recompute.keep_last_blocks(model, ids.numel(), int(budget_blocks * per_block)) as n:
            loss = model(ids, labels=ids).loss
        loss.backward()
        assert all(layer.gradient_checkpointing for layer in model.model.layers)  # restored
        return n, calls, loss.detach(), [p.grad for p in model.parameters()], model

    n0, calls0, loss0, grads0, _ = run(0)
    n2, calls2, loss2, grads2, model = run(2.5)
    assert (n0, calls0) == (0, [2, 2, 2, 2])
    assert (n2, calls2) == (2, [2, 2, 1, 1])  # the last two blocks kept, not recomputed
    assert torch.equal(loss2, loss0)
    for got, want in zip(grads2, grads0, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    # The last kept block was measured; the config estimate errs high for Llama blocks.
    measured = recompute._MEASURED[model]
    assert 0 < measured < recompute._estimate(model)
    assert recompute.block_bytes_per_token(model) == measured


def test_pair_logps_keeps_activations_only_while_gradients_are_missing(examples):
    """Two micro-batches of one step: the first keeps (no gradient exists yet: logits and the
    last blocks), the second recomputes everything; the accumulated gradients equal those of
    a run that keeps nothing."""
    results = {}
    for keep in (False, True):
        # Wide enough that the missing gradients (mostly the untied embedding's) hold the
        # logits and some blocks, not all.
        model = tiny_llama(num_hidden_layers=4, hidden_size=256, intermediate_size=512).train()
        enable_activation_checkpointing(model)
        calls = _counting(model)
        per_micro = []
        for half in (examples[:3], examples[3:]):
            before = list(calls)
            out = pair_logps(model, half, pad_token_id=0, chunk_size=16, keep_activations=keep)
            (out.chosen - 0.5 * out.rejected).sum().backward()
            per_micro.append([a - b for a, b in zip(calls, before, strict=True)])
        results[keep] = (per_micro, [p.grad for p in model.parameters()])
    assert results[False][0] == [[2, 2, 2, 2]] * 2
    first, second = results[True][0]
    assert 1 in first and first[0] == 2  # some last blocks kept, the first one recomputed
    assert second == [2, 2, 2, 2]  # gradients exist: nothing is free to keep
    for got, want in zip(results[True][1], results[False][1], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_spare_bytes_counts_missing_trainable_gradients():
    model = tiny_llama()
    total = sum(p.numel() * 4 for p in model.parameters())
    assert recompute.spare_bytes(model) == total
    model.lm_head.weight.requires_grad_(False)
    frozen = model.lm_head.weight.numel() * 4
    assert recompute.spare_bytes(model) == total - frozen
    model.model.norm.weight.grad = torch.zeros_like(model.model.norm.weight)
    assert recompute.spare_bytes(model) == total - frozen - model.model.norm.weight.numel() * 4
