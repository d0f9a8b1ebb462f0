"""FlexAttention over the pair layout: the block mask is the segment path's rule, and the
forward matches the segment path (on CPU; the backward is checked on GPU by
benchmarks/flex_check.py, as FlexAttention has no CPU backward)."""

from __future__ import annotations

import dataclasses
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

from preftune import attention
from preftune.config import ConfigError, DPOConfig
from preftune.fastpath import FastpathFallbackWarning, FastPaths, build_layout, decide_fast_paths
from preftune.fastpath import _layout_logps as layout_logps
from preftune.train import fast_paths

from .conftest import tiny_llama

VOCAB = 256


def _pair(prompt: int, chosen: int, rejected: int, seed: int) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(1, VOCAB, (prompt,), generator=g).tolist()
    c = p + torch.randint(1, VOCAB, (chosen,), generator=g).tolist()
    r = p + torch.randint(1, VOCAB, (rejected,), generator=g).tolist()
    return {"chosen_input_ids": c, "chosen_labels": [-100] * prompt + c[prompt:],
            "rejected_input_ids": r, "rejected_labels": [-100] * prompt + r[prompt:]}


# Five pairs packed into rows of at most 24 tokens: several pairs per row, padded row tails,
# one pair with no prompt and one whose rejected response is empty.
PAIRS = [_pair(4, 3, 5, 0), _pair(6, 2, 2, 1), _pair(0, 4, 3, 2), _pair(3, 5, 0, 3),
         _pair(2, 1, 6, 4)]


def _layout():
    layout = build_layout(PAIRS, pad_token_id=0, token_budget=24)
    assert len(layout.segments) > 1 and max(len(row) for row in layout.segments) > 1
    assert (layout.padding_mask == 0).any()
    return layout


def _element_mask(mask, length: int) -> torch.Tensor:
    """What FlexAttention computes from a BlockMask, per element: full blocks attend
    everywhere, partial blocks where ``mask_mod`` allows, unlisted blocks nowhere."""
    bq, bk = mask.BLOCK_SIZE
    rows, _, n_q = mask.kv_num_blocks.shape
    out = torch.zeros(rows, length, length, dtype=torch.bool)
    pos = torch.arange(length)
    for b in range(rows):
        for qb in range(n_q):
            q = pos[qb * bq : (qb + 1) * bq, None]
            for full, num, idx in ((False, mask.kv_num_blocks, mask.kv_indices),
                                   (True, mask.full_kv_num_blocks, mask.full_kv_indices)):
                for kb in idx[b, 0, qb, : num[b, 0, qb]].tolist():
                    k = pos[None, kb * bk : (kb + 1) * bk]
                    allowed = True if full else mask.mask_mod(b, 0, q, k)
                    out[b, q, k] = allowed
    return out


def test_block_mask_is_the_segment_paths_rule():
    """Element by element, the BlockMask allows what the layout's dense mask allows (same
    unit, causal, chosen and rejected tails apart), and padding queries see nothing (their
    outputs are zeros, as on the segment path). Small blocks: some are skipped, some full."""
    layout = _layout()
    length = layout.input_ids.shape[1]
    mask = attention.block_mask(layout.segment_ids, layout.branch_ids, block_size=4)
    real = layout.padding_mask.bool()[:, :, None]
    want = layout.attention_mask("sdpa", torch.float32)[:, 0] & real
    assert _element_mask(mask, length).equal(want)
    blocks = mask.to_dense()
    assert not blocks.all() and (mask.full_kv_num_blocks > 0).any()


def test_flex_forward_matches_the_segment_path(monkeypatch):
    """The flex kernel in a model: one FlexAttention call per layer for the micro-batch, the
    segment path's log-probs within 1e-5 (fp32, forward only: no flex backward on CPU)."""
    model = tiny_llama(vocab_size=VOCAB)
    layout = _layout()
    segment = decide_fast_paths(FastPaths(pad_token_id=0, chunked=False, token_budget=24),
                                [model], max_length=16)
    assert segment.segments and segment.attention_kernel == "segment"
    calls = []
    flex = attention._flex
    monkeypatch.setattr(attention, "_flex", lambda *a, **k: calls.append(1) or flex(*a, **k))
    with torch.no_grad():
        want = layout_logps(model, layout, segment, average=False)
        assert not calls
        got = layout_logps(model, layout, dataclasses.replace(segment, attention_kernel="flex"),
                           average=False)
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(got.chosen, want.chosen, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.rejected, want.rejected, rtol=0, atol=1e-5)


def test_kernel_choice():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert attention.choose_kernel("auto", [cuda]) == ("flex", None)
    assert attention.choose_kernel("flex", [cuda, cuda]) == ("flex", None)
    assert attention.choose_kernel("segment", [cuda]) == ("segment", None)
    assert attention.choose_kernel("auto", [cuda, cpu]) == ("segment", None)
    kernel, why = attention.choose_kernel("flex", [cpu])
    assert kernel == "segment" and why == ("flex attention off (models on cpu: FlexAttention "
                                           "trains on CUDA only)")
    with pytest.raises(ValueError, match="attention_kernel: expected one of auto, segment, flex"):
        attention.choose_kernel("flash", [cuda])


def test_decision_on_cpu_keeps_the_segment_path():
    """auto on CPU: the segment kernel, no warning; an explicit flex falls back, with one
    warning naming the reason."""
    model = tiny_llama(vocab_size=VOCAB)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastpathFallbackWarning)
        auto = decide_fast_paths(FastPaths(pad_token_id=0), [model], max_length=16)
    assert auto.attention_kernel == "segment" and not auto.fallbacks
    with pytest.warns(FastpathFallbackWarning, match="flex attention off"):
        flex = decide_fast_paths(FastPaths(pad_token_id=0, attention_kernel="flex"), [model], 16)
    assert flex.attention_kernel == "segment" and flex.segments


def test_config_key(monkeypatch):
    args = {"model": "m", "dataset": "d"}
    assert DPOConfig(**args).attention_kernel == "auto"
    segment = DPOConfig(**args, attention_kernel="segment")
    assert fast_paths(segment, 0).attention_kernel == "segment"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        DPOConfig(**args, attention_kernel="flex")
    assert str(e.value) == ("attention_kernel: flex needs a CUDA device (FlexAttention has no "
                            "backward on CPU); use auto or segment")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fast_paths(DPOConfig(**args, attention_kernel="flex"), 0).attention_kernel == "flex"
    with pytest.raises(ConfigError, match="attention_kernel: flex needs a CUDA device"):
        DPOConfig(**args, attention_kernel="flex", device="cpu")
    with pytest.raises(ConfigError, match="needs segment_attention=true"):
        DPOConfig(**args, attention_kernel="flex", segment_attention=False)
    with pytest.raises(ConfigError, match="attention_kernel: expected one of auto, segment, flex"):
        DPOConfig(**args, attention_kernel="flash")


def test_gpu_check_runs_its_forward_on_cpu():
    """benchmarks/flex_check.py's function, forward only here (its backward needs CUDA)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "flex_check.py"
    spec = importlib.util.spec_from_file_location("flex_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.flex_backward_check("cpu", backward=False, budgets=(None,))
    assert result["flex_calls"] == 2 and result["logps"] < 1e-5 and result["loss"] < 1e-6
