"""Precomputed reference log-probs: equal to the live reference, cached under a fingerprint."""

import json

import pytest
import torch

from preftune.config import DPOConfig
from preftune.data import collate_pairs, read_pairs, tokenize_pair
from preftune.logprobs import concatenated_logps
from preftune.reference import cached_reference_logps, fingerprint, weights_digest
from preftune.train import train

from .conftest import HH_HELPFUL, tiny_llama

RUN = {"max_length": 48, "max_prompt_length": 24, "eval_examples": 4, "n_samples": 2,
       "max_new_tokens": 3, "warmup_steps": 0, "eval_every": 2, "batch_size": 4,
       "micro_batch_size": 2, "max_examples": 16, "max_steps": 4, "lr": 1e-3,
       "optimizer": "adamw", "dataset": str(HH_HELPFUL)}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "preftune" / "reference-logps"


@pytest.fixture(scope="module")
def examples(gpt2_tokenizer):
    pairs = [p for _, p in zip(range(10), read_pairs(HH_HELPFUL, quiet=True), strict=False)]
    return [tokenize_pair(p, gpt2_tokenizer, max_length=48, max_prompt_length=24) for p in pairs]


def _batches(size=3):
    return lambda exs: (collate_pairs(exs[i : i + size], 50256) for i in range(0, len(exs), size))


def test_cached_logps_equal_live_forward_and_hit_the_second_time(examples, private_cache):
    model = tiny_llama(vocab_size=50257)
    (chosen, rejected), hit = cached_reference_logps(model, examples, _batches(),
                                                     average=False, cache_dir=private_cache)
    assert not hit and len(list(private_cache.glob("*.safetensors"))) == 1
    with torch.no_grad():
        live = concatenated_logps(model, collate_pairs(examples, 50256))
    torch.testing.assert_close(chosen, live.chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(rejected, live.rejected, rtol=1e-5, atol=1e-4)
    (again, _), hit = cached_reference_logps(model, examples, _batches(5), average=False,
                                             cache_dir=private_cache)
    assert hit and torch.equal(again, chosen)


def test_fingerprint_changes_with_weights_data_and_settings(examples):
    model = tiny_llama(vocab_size=50257)
    base = fingerprint(model, examples, average=False)
    assert fingerprint(model, examples, average=False) == base
    assert fingerprint(model, examples, average=True) != base
    assert fingerprint(model, examples[:-1], average=False) != base
    changed = [dict(ex) for ex in examples]
    changed[3] = {**changed[3], "chosen_labels": changed[3]["chosen_labels"][:-1] + [-100]}
    assert fingerprint(model, changed, average=False) != base  # e.g. another truncation
    digest = weights_digest(model)
    assert fingerprint(model, examples, average=False, weights=digest) == base
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert weights_digest(model) != digest
    assert fingerprint(model, examples, average=False) != base


def _train_rows(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows


def test_precomputed_reference_run_matches_live_reference_run(tmp_path, tiny_model_dir,
                                                              capfd):
    live = train(DPOConfig(**RUN, model=str(tiny_model_dir), precompute_reference=False,
                           output_dir=str(tmp_path / "live")), progress=False)
    pre = train(DPOConfig(**RUN, model=str(tiny_model_dir), output_dir=str(tmp_path / "pre")),
                progress=False)
    assert "computed and cached" in capfd.readouterr().err
    for a, b in zip(_train_rows(live), _train_rows(pre), strict=True):
        assert a["split"] == b["split"] and a["step"] == b["step"]
        for key in ("loss", "rewards/margins", "rewards/chosen", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (a["step"], key)
    samples = [json.loads(line) for line in (pre / "samples.jsonl").read_text().splitlines()]
    live_samples = [json.loads(line)
                    for line in (live / "samples.jsonl").read_text().splitlines()]
    assert [s["reference"] for s in samples] == [s["reference"] for s in live_samples]
    # A later run with the same reference, data and settings reuses the cache.
    train(DPOConfig(**RUN, model=str(tiny_model_dir), output_dir=str(tmp_path / "again")),
          progress=False)
    assert "from cache" in capfd.readouterr().err
    # Other settings (another truncation) miss it.
    train(DPOConfig(**{**RUN, "max_length": 40}, model=str(tiny_model_dir),
                    output_dir=str(tmp_path / "other")), progress=False)
    assert "computed and cached" in capfd.readouterr().err


def _warnings(err: str) -> list[str]:
    """The warning lines of stderr (the reference pass's progress bar redraws with \r)."""
    return [part for line in err.splitlines() for part in line.split("\r")
            if part.startswith("preftune: warning:")]


@pytest.mark.parametrize("damage", ["truncated", "wrong keys", "wrong shape"])
def test_damaged_cache_entry_is_recomputed_and_replaced(examples, private_cache, capfd, damage):
    from safetensors.torch import save_file

    model = tiny_llama(vocab_size=50257)
    (chosen, rejected), _ = cached_reference_logps(model, examples, _batches(), average=False,
                                                   cache_dir=private_cache)
    [entry] = private_cache.glob("*.safetensors")
    if damage == "truncated":  # what a crash before the data reached the disk leaves
        entry.write_bytes(entry.read_bytes()[:40])
    elif damage == "wrong keys":
        save_file({"chosen": chosen}, entry)
    else:
        save_file({"chosen": chosen[:3], "rejected": rejected[:3]}, entry)
    capfd.readouterr()
    (again, _), hit = cached_reference_logps(model, examples, _batches(), average=False,
                                             cache_dir=private_cache)
    assert not hit and torch.equal(again, chosen)
    [line] = _warnings(capfd.readouterr().err)
    assert line.startswith(f"preftune: warning: {entry}: damaged reference log-prob cache entry (")
    assert line.endswith("); recomputing it")
    (_, _), hit = cached_reference_logps(model, examples, _batches(), average=False,
                                         cache_dir=private_cache)
    assert hit  # the entry was replaced


def test_unwritable_cache_warns_and_returns_the_logps(examples, tmp_path, capfd):
    blocked = tmp_path / "file"  # nobody, root included, can make a folder under a file
    blocked.write_text("")
    model = tiny_llama(vocab_size=50257)
    (chosen, _), hit = cached_reference_logps(model, examples, _batches(), average=False,
                                              cache_dir=blocked / "cache")
    assert not hit and chosen.shape == (len(examples),)
    [line] = _warnings(capfd.readouterr().err)
    assert line.startswith(f"preftune: warning: cannot write the reference log-prob cache in "
                           f"{blocked / 'cache'} (")
    assert line.endswith("); training goes on without it")
