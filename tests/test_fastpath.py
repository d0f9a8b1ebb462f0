"""The fast paths give the log-probs (and gradients) of ``concatenated_logps``, on real data."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoTokenizer,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from preftune.data import collate_pairs, read_pairs, tokenize_pair
from preftune.fastpath import (
    FastpathFallbackWarning,
    build_layout,
    chunked_target_logps,
    pair_logps,
    supports_fastpath,
)
from preftune.logprobs import IGNORE_INDEX, concatenated_logps

from .conftest import GPT2_TOKENIZER, HH_HELPFUL, random_head, tiny_gpt2, tiny_llama

VOCAB = 50257  # GPT-2's: the real token ids
SMALL_VOCAB = 4096  # the technique x family matrix runs on ids mod 4096: 12x less head work
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


def tiny_qwen2(**overrides) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**{**SMALL, **overrides})).eval()


def tiny_qwen3(**overrides) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(**{**SMALL, "head_dim": 8, **overrides})).eval()


def tiny_mistral(**overrides) -> MistralForCausalLM:
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(**{**SMALL, **overrides})).eval()


FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a busy shared machine, waiting on a descheduled sibling thread
    made these [N, V]-sized ops several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def examples():
    """Real HH pairs: truncated prompts and responses, uneven lengths, plus one pair whose
    responses share their first tokens (the shared prefix then runs past the prompt)."""
    tok = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    pairs = list(itertools.islice(read_pairs(HH_HELPFUL, quiet=True), 27))
    out = [tokenize_pair(pairs[i], tok, max_length=64, max_prompt_length=32)
           for i in (0, 3, 6, 8, 11, 18, 22, 26)]
    e = dict(out[2])
    p = len(e["prompt_input_ids"])
    rejected = e["chosen_input_ids"][: p + 3] + e["rejected_input_ids"][p : p + 20]
    out.append({**e, "rejected_input_ids": rejected,
                "rejected_labels": [IGNORE_INDEX] * p + rejected[p:]})
    lengths = {len(x[f"{s}_input_ids"]) for x in out for s in ("chosen", "rejected")}
    assert len(lengths) > 5  # padding
    assert any(len(x["prompt_input_ids"]) == 32 for x in out)  # keep_end-truncated prompts
    assert any(x["chosen_input_ids"][-1] != tok.eos_token_id for x in out)  # cut responses
    return out


@pytest.fixture(scope="module")
def small_examples(examples):
    """The same pairs (lengths, shared prompts, labels) with ids folded into SMALL_VOCAB."""
    return [{k: [t if t == IGNORE_INDEX else t % SMALL_VOCAB for t in v] for k, v in e.items()}
            for e in examples]


def _run(model, fn):
    model.zero_grad(set_to_none=True)
    out = fn()
    (out.chosen.sum() - 0.5 * out.rejected.sum()).backward()  # a DPO-like scalar
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(got, want, got_grads=None, want_grads=None):
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if want_grads is None:
        return
    assert got_grads.keys() == want_grads.keys()
    for name, want_g in want_grads.items():
        # float32: elementwise within 1e-5 of the parameter's gradient scale, and in norm.
        scale = want_g.abs().max().item()
        torch.testing.assert_close(got_grads[name], want_g, rtol=1e-5, atol=1e-5 * scale + 1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
        assert (got_grads[name] - want_g).norm() <= 1e-5 * want_g.norm() + 1e-6, name


# With sdpa, share/pack attend per pair segment unless segments=False ("masked": one masked
# call per row); eager always takes the mask. A token_budget keeps several padded rows.
MODES = {
    "chunked": dict(chunked=True, share_prompt=False, pack=False, chunk_size=64),
    "share": dict(chunked=False, share_prompt=True, pack=False),
    "share/masked": dict(chunked=False, share_prompt=True, pack=False, segments=False),
    "pack": dict(chunked=False, share_prompt=False, pack=True, token_budget=150),
    "share+pack": dict(chunked=False, share_prompt=True, pack=True),
    "share+pack/masked": dict(chunked=False, share_prompt=True, pack=True, segments=False),
    "all": dict(chunked=True, share_prompt=True, pack=True, chunk_size=100, token_budget=250),
}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_technique_equals_concatenated_logps(family, attn, small_examples):
    examples = small_examples
    model = FAMILIES[family](vocab_size=SMALL_VOCAB, attn_implementation=attn,
                             bos_token_id=1, eos_token_id=2)
    assert model.config._attn_implementation == attn
    assert supports_fastpath(model) is True
    batch = collate_pairs(examples, 0)
    for average in (False, True):
        want, want_grads = _run(
            model, lambda a=average: concatenated_logps(model, batch, average=a))
        for name, flags in MODES.items():
            if (average and name not in ("chunked", "all")) or (attn, "masked") == (
                    "eager", name.rpartition("/")[2]):
                continue
            got, got_grads = _run(model, lambda f=flags, a=average: pair_logps(
                model, examples, pad_token_id=0, average=a, **f))
            try:
                _assert_same(got, want, got_grads, want_grads)
            except AssertionError as e:
                raise AssertionError(f"{family}/{attn}/{name}/average={average}: {e}") from None


@pytest.mark.parametrize("make", [tiny_qwen3, tiny_mistral], ids=["qwen3", "mistral"])
def test_other_supported_families(make, small_examples):
    model = make(vocab_size=SMALL_VOCAB)
    batch = collate_pairs(small_examples, 0)
    want, want_grads = _run(model, lambda: concatenated_logps(model, batch))
    got, got_grads = _run(model, lambda: pair_logps(model, small_examples, pad_token_id=0))
    _assert_same(got, want, got_grads, want_grads)


def test_full_vocabulary_tied_gpt2(examples):
    """Real GPT-2 ids through a tied 50257-token head: the weight gets both gradients."""
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    batch = collate_pairs(examples, 50256)
    want, want_grads = _run(model, lambda: concatenated_logps(model, batch))
    got, got_grads = _run(model, lambda: pair_logps(model, examples, pad_token_id=50256,
                                                    chunk_size=128))
    _assert_same(got, want, got_grads, want_grads)


class _Outputs(TorchDispatchMode):
    """Records (numel, newly allocated) for every tensor an op produces, forward and backward;
    views and in-place results share an input's storage and are not new."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[int, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr()
                  for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((t.numel(), t.untyped_storage().data_ptr() not in inputs))
        return out


def test_tied_embedding_backward_makes_one_vocabulary_sized_buffer(examples):
    """The lookup adds its rows into the head's gradient in place; autograd's embedding
    backward would build a second dense [V, H] gradient to add to it."""
    model = tiny_gpt2()
    weight = model.lm_head.weight
    assert weight is model.transformer.wte.weight

    def allocations(fn):
        model.zero_grad(set_to_none=True)
        out = fn()
        with _Outputs() as mode:
            (out.chosen.sum() - out.rejected.sum()).backward()
        return sum(new for numel, new in mode.outputs if numel == weight.numel())

    batch = collate_pairs(examples, 50256)
    assert allocations(lambda: concatenated_logps(model, batch)) >= 2  # head and lookup
    assert allocations(lambda: pair_logps(model, examples, pad_token_id=50256)) == 1


def test_embedding_gradient_accumulates_and_skips_the_padding_row(small_examples):
    """Two micro-batches into one gradient, as training accumulates; ``padding_idx`` rows get
    no gradient, as ``nn.Embedding`` does, while pad tokens fill the packed rows."""
    model = tiny_llama(vocab_size=SMALL_VOCAB, pad_token_id=0)
    embedding = model.get_input_embeddings().weight
    assert model.get_input_embeddings().padding_idx == 0

    def two_micro_batches(fn):
        model.zero_grad(set_to_none=True)
        for part in (small_examples[:4], small_examples[4:]):
            out = fn(part)
            (out.chosen.sum() - 0.5 * out.rejected.sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    want = two_micro_batches(lambda ex: concatenated_logps(model, collate_pairs(ex, 0)))
    got = two_micro_batches(lambda ex: pair_logps(model, ex, pad_token_id=0, token_budget=200))
    _assert_same([], [], got, want)
    assert not got["model.embed_tokens.weight"][0].any()
    assert embedding.grad[1:].abs().sum() > 0


def test_float64_is_exact_beyond_float32_noise(small_examples):
    """In float64 the float32 rounding noise is gone: what is left is the method's error."""
    model = tiny_gpt2(vocab_size=SMALL_VOCAB, bos_token_id=1, eos_token_id=2).double()
    batch = collate_pairs(small_examples, 0)
    want, want_grads = _run(model, lambda: concatenated_logps(model, batch))
    got, got_grads = _run(model, lambda: pair_logps(model, small_examples, pad_token_id=0,
                                                    chunk_size=50))
    assert got.chosen.dtype == torch.float64
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-10)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-9, atol=1e-11)


def test_collated_batch_input_and_no_grad(small_examples):
    examples = small_examples
    model = tiny_llama(vocab_size=SMALL_VOCAB)
    batch = collate_pairs(examples, 0)
    want = pair_logps(model, examples, pad_token_id=0)
    with torch.no_grad():
        got = pair_logps(model, batch, pad_token_id=0)
        plain = concatenated_logps(model, batch)
    assert got.chosen.grad_fn is None
    _assert_same(got, plain)
    torch.testing.assert_close(got.chosen, want.chosen.detach())


def test_layout_shares_prompt_and_restarts_positions():
    ex = {"chosen_input_ids": [1, 2, 3, 10, 11], "chosen_labels": [-100, -100, -100, 10, 11],
          "rejected_input_ids": [1, 2, 3, 20], "rejected_labels": [-100, -100, -100, 20]}
    lay = build_layout([ex], pad_token_id=0, share_prompt=True, pack=False)
    assert lay.input_ids.tolist() == [[1, 2, 3, 10, 11, 20]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 4, 3]]
    # chosen 10 <- pos 2, chosen 11 <- pos 3; rejected 20 <- the prompt end (2), not chosen's 4
    assert lay.targets.tolist() == [10, 11, 20]
    assert lay.source.tolist() == [2, 3, 2]
    assert lay.sequence.tolist() == [0, 0, 1]
    assert lay.counts.tolist() == [2, 1]
    mask = lay.attention_mask("sdpa", torch.float32)[0, 0]
    assert mask[5].tolist() == [True, True, True, False, False, True]  # rejected: not chosen
    assert mask[4].tolist() == [True, True, True, True, True, False]
    eager = lay.attention_mask("eager", torch.float32)[0, 0]
    assert eager[5, 3] == torch.finfo(torch.float32).min and eager[5, 2] == 0


def test_layout_packs_into_fewer_rows(examples):
    plain = build_layout(examples, pad_token_id=0, share_prompt=False, pack=False)
    assert plain.input_ids.shape == (2 * len(examples), 64) and plain.position_ids is None
    shared = build_layout(examples, pad_token_id=0, share_prompt=True, pack=False)
    packed = build_layout(examples, pad_token_id=0, share_prompt=False, pack=True)
    both = build_layout(examples, pad_token_id=0, share_prompt=True, pack=True, token_budget=200)
    real = int(shared.padding_mask.sum())
    assert real == int(both.padding_mask.sum()) < int(packed.padding_mask.sum())
    assert int(packed.padding_mask.sum()) == int(plain.padding_mask.sum())
    assert packed.input_ids.shape[0] < plain.input_ids.shape[0]
    assert packed.input_ids.shape[1] == 64  # default budget: the longest unit
    assert both.input_ids.shape[0] < shared.input_ids.shape[0] and both.input_ids.shape[1] <= 200
    assert packed.input_ids.numel() < plain.input_ids.numel()
    assert both.input_ids.numel() < shared.input_ids.numel() < plain.input_ids.numel()
    big = build_layout(examples, pad_token_id=0, token_budget=10_000)
    assert big.input_ids.shape[0] == 1 and big.input_ids.shape[1] == real
    for lay in (plain, shared, packed, both, big):  # the same scored tokens, in any layout
        assert lay.counts.tolist() == plain.counts.tolist()
        assert sorted(lay.targets.tolist()) == sorted(plain.targets.tolist())


class _Wrapper(torch.nn.Module):
    """Not a transformers model: only its forward's logits are known."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_llama(vocab_size=SMALL_VOCAB)

    def forward(self, **kwargs):
        return self.inner(**kwargs)


@pytest.mark.parametrize(
    ("make", "reason", "message"),
    [
        (_Wrapper, "not a transformers PreTrainedModel", "fast paths off"),
        (lambda: tiny_llama(SMALL_VOCAB, final_logit_softcapping=30.0), "final_logit_softcapping",
         "chunked log-probs off"),
        (lambda: tiny_mistral(vocab_size=SMALL_VOCAB, sliding_window=16), None,
         "prompt sharing/packing off"),
    ],
    ids=["dummy-module", "softcapping", "short-sliding-window"],
)
def test_fallback_warns_and_stays_exact(make, reason, message, small_examples):
    examples = small_examples
    model = make()
    support = supports_fastpath(model)
    if reason is None:
        assert support is True  # a data-dependent limit: only pair_logps sees it
    else:
        assert isinstance(support, str) and reason in support
    batch = collate_pairs(examples, 0)
    want, want_grads = _run(model, lambda: concatenated_logps(model, batch))
    with pytest.warns(FastpathFallbackWarning, match=message) as record:
        got, got_grads = _run(model, lambda: pair_logps(model, examples, pad_token_id=0))
    assert len(record) == 1 and "\n" not in str(record[0].message)
    _assert_same(got, want, got_grads, want_grads)


def test_unsupported_attention_implementation_is_reported():
    model = tiny_llama()
    model.config._attn_implementation = "flex_attention"
    support = supports_fastpath(model)
    assert isinstance(support, str) and "flex_attention" in support
    assert supports_fastpath(model, share_prompt=False, pack=False) is True


# ----------------------------------------------------------------------------- memory


def _saved_tensors(model, fn):
    """Shapes of every non-parameter tensor the autograd graph keeps for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_chunked_keeps_no_full_vocabulary_tensor(examples):
    examples = examples[:4]
    model = tiny_llama()
    chunk = 32
    n_scored = int(build_layout(examples, pad_token_id=0).counts.sum())
    assert n_scored > 4 * chunk

    # control: the plain path keeps [2B, T, V] logits for backward
    batch = collate_pairs(examples, 50256)
    _, saved = _saved_tensors(model, lambda: concatenated_logps(model, batch))
    assert [s for s in saved if s[-1] == VOCAB and s[0] * s[1] >= 2 * len(examples) * 63], saved

    # keep_activations would keep chunk logits while no gradient exists (tests/test_recompute.py)
    for flags in (dict(share_prompt=False, pack=False, keep_activations=False),
                  dict(keep_activations=False)):
        out, saved = _saved_tensors(model, lambda f=flags: pair_logps(
            model, examples, pad_token_id=50256, chunk_size=chunk, **f))
        assert saved and not [s for s in saved if VOCAB in s], saved
        with _Outputs() as mode:
            out = pair_logps(model, examples, pad_token_id=50256, chunk_size=chunk, **flags)
            (out.chosen.sum() - out.rejected.sum()).backward()
        largest = max(numel for numel, _ in mode.outputs)
        # nothing larger than one chunk of logits (or the [V, H] head weight's gradient)
        assert largest <= max(chunk * VOCAB, model.lm_head.weight.numel())
        assert largest < n_scored * VOCAB / 4


def test_chunked_function_matches_log_softmax_with_bias():
    hidden, weight, bias, targets = random_head(4)
    got = chunked_target_logps(hidden, weight, bias, targets, chunk_size=3)
    want = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(
        lambda h, w, b: chunked_target_logps(h, w, b, targets, 3), (hidden, weight, bias)
    )


def test_bf16_autocast_backward_recomputes_under_autocast():
    """Backward recomputes the chunk logits under forward's autocast state, so the gradient
    reaching the decoder body carries exactly the bf16 rounding of the plain path's."""
    torch.manual_seed(0)
    hidden = torch.randn(300, 32, requires_grad=True)
    weight = torch.randn(4096, 32, requires_grad=True)
    targets = torch.randint(0, 4096, (300,))

    def grads(fn):
        hidden.grad = weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn().sum()
        out.backward()  # outside the autocast block, as a training loop does
        return hidden.grad.clone(), weight.grad.clone()

    def plain():
        logits = torch.nn.functional.linear(hidden, weight).float()
        return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)

    want_h, want_w = grads(plain)
    got_h, got_w = grads(lambda: chunked_target_logps(hidden, weight, None, targets, 64))
    assert (got_h - want_h).norm() <= 1e-4 * want_h.norm()  # bf16 noise would be ~2e-3
    # the weight gradient sums float32 chunk products instead of one bf16 matmul
    assert (got_w - want_w).norm() <= 1e-2 * want_w.norm()


def test_bf16_autocast_fast_path_is_close_to_the_plain_path(small_examples):
    """The whole fast path under bf16 autocast: the same values up to bf16 rounding."""
    model = tiny_llama(vocab_size=SMALL_VOCAB)
    batch = collate_pairs(small_examples, 0)

    def run(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _run(model, fn)

    want, want_grads = run(lambda: concatenated_logps(model, batch))
    got, got_grads = run(lambda: pair_logps(model, small_examples, pad_token_id=0,
                                            chunk_size=64))
    torch.testing.assert_close(got.chosen, want.chosen, rtol=1e-3, atol=1e-2)
    for name, g in want_grads.items():
        assert (got_grads[name] - g).norm() <= 2e-2 * g.norm() + 1e-6, name


def test_config_fast_paths_are_pair_logps_keywords():
    import inspect

    from preftune.config import DPOConfig
    from preftune.train import fast_paths

    cfg = DPOConfig(model="m", dataset="d")
    fast = fast_paths(cfg, 0)
    assert set(fast.flags()) <= set(inspect.signature(pair_logps).parameters)
    assert fast.segments is cfg.segment_attention is True
    off = DPOConfig(model="m", dataset="d", chunked_logps=False, share_prompt=False, pack=False)
    assert fast_paths(off, 0) is None
