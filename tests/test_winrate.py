import math

import pytest
import torch

from preftune.evaluate import completion_logps, completion_mask, sample
from preftune.winrate import Z95, kl_estimate, mean_interval, win_rate

from .conftest import tiny_gpt2, tiny_llama


def test_win_rate_counts_ties_apart():
    # prompt 0: 3 vs {1, 3}: one win, one tie; 5 vs {1, 3}: two wins. prompt 1: 0 vs 2: a loss.
    out = win_rate([[3.0, 5.0], [0.0]], [[1.0, 3.0], [2.0]])
    assert (out["wins"], out["ties"], out["losses"], out["comparisons"]) == (3, 1, 1, 5)
    assert (out["win_rate"], out["tie_rate"], out["loss_rate"]) == (0.6, 0.2, 0.2)
    # the interval is over prompts: per-prompt win fractions 3/4 and 0
    assert out["win_rate_low"] == pytest.approx(0.375 - Z95 * 0.375)
    assert out["win_rate_high"] == pytest.approx(0.375 + Z95 * 0.375)


def test_win_rate_identical_samples_is_symmetric():
    scores = [[0.1, 0.5, -0.2], [0.0, 0.0, 0.3]]
    out = win_rate(scores, scores)
    assert out["wins"] == out["losses"] == 3 + 2 and out["ties"] == 3 + 5
    with pytest.raises(ValueError, match="2 policy prompts but 1 reference"):
        win_rate(scores, scores[:1])


def test_mean_interval():
    out = mean_interval([1.0, 2.0, 3.0, 4.0])
    se = math.sqrt((1.5**2 * 2 + 0.5**2 * 2) / 3 / 4)
    assert out == pytest.approx({"mean": 2.5, "stderr": se, "low": 2.5 - Z95 * se,
                                 "high": 2.5 + Z95 * se, "n": 4})
    assert mean_interval([7.0]) == {"mean": 7.0, "stderr": None, "low": None, "high": None,
                                    "n": 1}
    assert mean_interval([])["mean"] is None


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 9, 2, 9]])
    assert completion_mask(ids, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def _peaked(seed):
    """A 5-token Llama whose next-token distributions are far from uniform, with no EOS: every
    completion is exactly as long as max_new_tokens."""
    model = tiny_llama(vocab_size=5, seed=seed, initializer_range=0.5)
    model.generation_config.eos_token_id = None
    return model


def test_kl_estimate_matches_exact_sequence_kl():
    policy, reference = _peaked(0), _peaked(1)
    prompt = torch.tensor([[3, 1]])
    # exact, by enumerating all 25 two-token completions
    seqs = torch.tensor([[a, b] for a in range(5) for b in range(5)])
    prompts, ones = prompt.expand(25, -1), torch.ones(25, 2, dtype=torch.long)
    lp = completion_logps(policy, prompts, ones, seqs, ones).double()
    lr = completion_logps(reference, prompts, ones, seqs, ones).double()
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    exact = (lp.exp() * (lp - lr)).sum().item()
    # the same number by the chain rule over next-token distributions (an independent route)
    def next_token(model, ids):
        return model(input_ids=ids).logits[:, -1].double().log_softmax(-1)

    with torch.no_grad():
        p1, q1 = next_token(policy, prompt)[0], next_token(reference, prompt)[0]
        chain = (p1.exp() * (p1 - q1)).sum()
        for a in range(5):
            ids = torch.cat([prompt, torch.tensor([[a]])], dim=1)
            p2, q2 = next_token(policy, ids)[0], next_token(reference, ids)[0]
            chain += p1[a].exp() * (p2.exp() * (p2 - q2)).sum()
    assert exact == pytest.approx(chain.item(), rel=1e-5)
    assert exact > 0.05  # far enough from 0 for the sampling check to mean something

    # estimated from 4000 samples of the policy, at a fixed seed
    torch.manual_seed(0)
    n = 4000
    prompts, mask = prompt.expand(n, -1), torch.ones(n, 2, dtype=torch.long)
    new, new_mask, own = sample(policy, prompts, mask, max_new_tokens=2, pad_token_id=0, eos=[],
                                logps=True)
    assert new.shape == (n, 2) and bool(new_mask.all())
    # the log-probs read off the sampling logits are the recomputed ones
    torch.testing.assert_close(own, completion_logps(policy, prompts, mask, new, new_mask),
                               rtol=1e-5, atol=1e-5)
    est = kl_estimate(own.tolist(),
                      completion_logps(reference, prompts, mask, new, new_mask).tolist())
    assert est["n"] == n and est["stderr"] < 0.1 * exact
    assert abs(est["mean"] - exact) < 3 * est["stderr"]


def test_completion_logps_left_padding_and_eos():
    """A left-padded prompt and a completion cut at EOS give the log-prob of the unpadded
    sequence's completion tokens up to and including EOS."""
    model = _peaked(0)
    full = completion_logps(model, torch.tensor([[3, 1]]), torch.ones(1, 2, dtype=torch.long),
                            torch.tensor([[4, 2]]), torch.ones(1, 2, dtype=torch.long))
    new = torch.tensor([[4, 2, 0, 0]])
    padded = completion_logps(model, torch.tensor([[0, 0, 3, 1]]), torch.tensor([[0, 0, 1, 1]]),
                              new, completion_mask(new, [2]))
    assert padded.item() == pytest.approx(full.item(), abs=1e-5)


def _naive_logps(model, prompt, prompt_mask, new, new_mask):
    """Summed completion log-probs from one full forward and a log-softmax over every
    position's logits."""
    mask = torch.cat([prompt_mask, new_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt, new], 1), attention_mask=mask,
                       position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    width = prompt.shape[1]
    token = logits[:, width - 1 : -1].log_softmax(-1).gather(2, new.unsqueeze(-1)).squeeze(-1)
    return (token * new_mask).sum(1)


def _batch_sizes(model):
    """The batch size of every forward of ``model``, recorded by a pre-hook."""
    sizes = []
    model.register_forward_pre_hook(lambda m, a, kw: sizes.append(
        (a[0] if a else kw["input_ids"]).shape[0]), with_kwargs=True)
    return sizes


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("repeated", [False, True])
def test_completion_logps_equal_the_full_logits_computation(family, repeated):
    """Logits kept for completion positions only (``logits_to_keep``), or each distinct
    prompt run once with its cache shared by its rows, give the numbers of the naive
    log-softmax over every position's logits."""
    model = (tiny_llama if family == "llama" else tiny_gpt2)(vocab_size=97, seed=3)
    torch.manual_seed(0)
    prompt, new = torch.randint(1, 97, (3, 5)), torch.randint(1, 97, (3, 4))
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1] * 5, [0, 1, 1, 1, 1]])
    if repeated:  # two samples of the first prompt, three of the second, one of the third
        rows = torch.tensor([0, 0, 1, 1, 1, 2])
        prompt, prompt_mask, new = prompt[rows], prompt_mask[rows], torch.randint(1, 97, (6, 4))
    new_mask = torch.ones_like(new)
    new_mask[1, 2:] = new_mask[2, 1:] = 0
    sizes = _batch_sizes(model)
    torch.testing.assert_close(completion_logps(model, prompt, prompt_mask, new, new_mask),
                               _naive_logps(model, prompt, prompt_mask, new, new_mask),
                               rtol=1e-5, atol=1e-5)
    assert sizes[0] == (3 if repeated else len(prompt))  # each distinct prompt once


@pytest.mark.parametrize(("repeated", "temperature", "top_p"),
                         [(False, 1.0, 1.0), (True, 1.0, 1.0), (True, 0.7, 0.9)])
def test_sampling_log_probs_with_padding_and_eos(repeated, temperature, top_p):
    """Left-padded prompts, rows that end at EOS early, each distinct prompt prefilled once
    when its samples are neighbours: the log-probs read off the sampling logits equal the
    naive computation's for the same completions (the model's, before temperature and
    top-p)."""
    model = tiny_llama(vocab_size=11, seed=1)
    torch.manual_seed(0)
    prompts = torch.tensor([[0, 0, 3, 4], [5, 6, 7, 8], [0, 9, 1, 2]])
    prompts = prompts.repeat_interleave(4, 0) if repeated else prompts.repeat(4, 1)
    mask = (prompts != 0).long()
    sizes = _batch_sizes(model)
    new, new_mask, own = sample(model, prompts, mask, max_new_tokens=6, pad_token_id=0,
                                eos=[10], logps=True, temperature=temperature, top_p=top_p)
    assert sizes[0] == (3 if repeated else 12)  # the shared prefill: one row per prompt
    assert 0 < int(new_mask.sum()) < new_mask.numel()  # some rows stopped at EOS
    torch.testing.assert_close(own, _naive_logps(model, prompts, mask, new, new_mask),
                               rtol=1e-5, atol=1e-5)


def test_sampling_draws_what_generate_draws_with_the_same_settings():
    """``sample`` applies temperature and top-p itself (after reading the raw logits): with
    one seed it draws the tokens generate's own warpers draw, so cached reference samples
    stay valid."""
    from transformers import GenerationConfig

    model = tiny_llama(vocab_size=23, seed=2)
    model.lm_head.weight.data *= 30  # logits spread over nats: temperature and top-p matter
    prompts = torch.tensor([[0, 3, 4], [5, 6, 7]]).repeat(3, 1)
    mask = (prompts != 0).long()
    torch.manual_seed(5)
    ours, _, _ = sample(model, prompts, mask, max_new_tokens=8, pad_token_id=0, eos=[],
                        temperature=0.7, top_p=0.8, logps=True)
    config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=0,
                              max_new_tokens=8, pad_token_id=0)
    torch.manual_seed(5)
    theirs = model.generate(input_ids=prompts, attention_mask=mask, generation_config=config)
    assert torch.equal(ours, theirs[:, prompts.shape[1]:])
