import torch

from preftune.logprobs import concatenated_logps, sequence_logps, token_counts

from .conftest import tiny_gpt2, tiny_llama


def naive_logps(model, input_ids, attention_mask, labels, average=False):
    """Per row, per token: log p(label) from a separate unpadded forward pass."""
    out = []
    for ids, mask, lab in zip(input_ids, attention_mask, labels, strict=True):
        n = int(mask.sum())
        logits = model(input_ids=ids[None, :n]).logits[0].double()
        total, count = 0.0, 0
        for t in range(1, n):
            if lab[t] != -100:
                total += torch.log_softmax(logits[t - 1], -1)[lab[t]].item()
                count += 1
        out.append(total / count if average else total)
    return torch.tensor(out, dtype=torch.float64)


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths, prompt = [9, 6, 12], [3, 2, 5]
    rej_lengths = [7, 12, 8]
    def side(lens):
        ids = torch.zeros(3, 12, dtype=torch.long)
        mask = torch.zeros(3, 12, dtype=torch.long)
        labels = torch.full((3, 12), -100)
        for i, (n, p) in enumerate(zip(lens, prompt, strict=True)):
            ids[i, :n] = torch.randint(0, vocab, (n,), generator=g)
            mask[i, :n] = 1
            labels[i, p:n] = ids[i, p:n]
        return ids, mask, labels
    c, r = side(lengths), side(rej_lengths)
    # shared prompt tokens, as a real collated batch has
    for i, p in enumerate(prompt):
        r[0][i, :p] = c[0][i, :p]
    keys = ("input_ids", "attention_mask", "labels")
    return {**{f"chosen_{k}": v for k, v in zip(keys, c, strict=True)},
            **{f"rejected_{k}": v for k, v in zip(keys, r, strict=True)}}


def test_sequence_logps_matches_naive_loop_on_padded_batch():
    for model in (tiny_llama(vocab_size=97), tiny_gpt2(vocab_size=97)):
        b = _batch(97)
        with torch.no_grad():
            logits = model(input_ids=b["chosen_input_ids"],
                           attention_mask=b["chosen_attention_mask"]).logits
            for average in (False, True):
                got = sequence_logps(logits, b["chosen_labels"], average=average)
                want = naive_logps(model, b["chosen_input_ids"], b["chosen_attention_mask"],
                                   b["chosen_labels"], average=average)
                assert got.shape == (3,) and got.dtype == torch.float32
                torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


def test_sequence_logps_bf16_logits_computed_in_float32():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 1, 2, 3, 4], [-100, -100, 5, 6, -100]])
    ref = sequence_logps(logits, labels)
    low = sequence_logps(logits.bfloat16(), labels)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, sequence_logps(logits.bfloat16().float(), labels))
    assert torch.allclose(low, ref, atol=0.1)


def test_token_counts_and_fully_masked_row():
    labels = torch.tensor([[-100, 1, 2, -100], [-100, -100, -100, -100]])
    assert token_counts(labels).tolist() == [2, 0]
    avg = sequence_logps(torch.randn(2, 4, 5), labels, average=True)
    assert avg[1].item() == 0.0


def test_concatenated_logps_equals_separate_forwards():
    model = tiny_llama(vocab_size=97)
    b = _batch(97)
    with torch.no_grad():
        out = concatenated_logps(model, b)
        avg = concatenated_logps(model, b, average=True)
    for side, got in (("chosen", out.chosen), ("rejected", out.rejected)):
        want = naive_logps(model, b[f"{side}_input_ids"], b[f"{side}_attention_mask"],
                           b[f"{side}_labels"])
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
    assert out.chosen_tokens.tolist() == [6, 4, 7]
    assert out.rejected_tokens.tolist() == [4, 10, 3]
    torch.testing.assert_close(avg.chosen, out.chosen / out.chosen_tokens)


def test_sequence_logps_gradient_matches_log_softmax_path():
    logits = torch.randn(2, 6, 13, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[-100, 1, 2, 3, 4, 5], [-100, -100, 7, 8, -100, -100]])
    sequence_logps(logits, labels).sum().backward()
    fast = logits.grad.clone()
    logits.grad = None
    lp = torch.log_softmax(logits[:, :-1], -1)
    lab = labels[:, 1:]
    mask = lab != -100
    (lp.gather(-1, lab.clamp(min=0)[..., None])[..., 0] * mask).sum().backward()
    torch.testing.assert_close(fast, logits.grad)
