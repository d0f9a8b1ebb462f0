"""Every fast path under FSDP2 (torchrun, gloo on CPU) gives the plain path's losses, gradients
and weights; two FSDP processes with fast paths follow one process's trajectory.

The worker half of this file runs under ``torchrun -m tests.test_fastpath_fsdp``: one launch
checks each model (untied Llama, tied Qwen2, LoRA with the adapter-off reference and eager
masks; the tied model again in bf16 mixed precision), prints a JSON summary that the tests
read, then trains a tied model end to end (precomputed reference) for the trajectory test.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen2Config, Qwen2ForCausalLM

from preftune import recompute
from preftune.attention import Plan
from preftune.config import DPOConfig
from preftune.fastpath import FastpathFallbackWarning, FastPaths, batch_logps, decide_fast_paths
from preftune.logprobs import concatenated_logps
from preftune.train import train

from .conftest import HH_HELPFUL, tiny_llama
from .test_distributed import _close, _train_records

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 512
BETA = 0.5
# Two steps of four pairs; each of the two ranks runs two micro-batches of one pair per step.
STEPS, BATCH, MICRO = 2, 4, 1
_SPARE_BYTES = recompute.spare_bytes
_spare_seen: list[int] = []


def _spare_bytes_seen(model) -> int:
    """``recompute.spare_bytes`` as the fast path asks it, recorded; returned large enough to
    keep activations whatever the tiny blocks' estimated cost."""
    _spare_seen.append(_SPARE_BYTES(model))
    return _spare_seen[-1] * 10**4


def tiny_qwen2_tied(vocab_size: int = VOCAB, seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    """Qwen2-0.5B-style: the output layer's weight is the input embedding's."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True, **overrides)
    model = Qwen2ForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _examples(n: int) -> list[dict[str, list[int]]]:
    """Pairs with shared prompts, uneven lengths, and responses that start alike (the shared
    prefix then runs past the prompt)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        p, c, r, same = 3 + i % 4, 2 + (3 * i) % 5, 1 + (2 * i) % 6, i % 3 == 0
        ids = [torch.randint(1, VOCAB, (k,), generator=g).tolist() for k in (p, c, r)]
        if same:
            ids[2] = ids[1][:1] + ids[2]
        prompt, chosen, rejected = ids
        out.append({"prompt_input_ids": prompt,
                    "chosen_input_ids": prompt + chosen,
                    "chosen_labels": [-100] * p + chosen,
                    "rejected_input_ids": prompt + rejected,
                    "rejected_labels": [-100] * p + rejected})
    return out


# ----------------------------------------------------------------------------- worker


def _dpo(pol, ref, pairs: int) -> torch.Tensor:
    logits = BETA * ((pol[0] - ref[0]) - (pol[1] - ref[1]))
    return -F.logsigmoid(logits).sum() / pairs


def _plain_step(model, reference, examples, lora: bool) -> tuple[float, dict]:
    """The global batch through the plain path in this process, unsharded."""
    from preftune.data import collate_pairs

    batch = collate_pairs(examples, 0)
    with torch.no_grad():
        if lora:
            with model.disable_adapter():
                ref = concatenated_logps(model, batch)
        else:
            ref = concatenated_logps(reference, batch)
    pol = concatenated_logps(model, batch)
    loss = _dpo(pol, ref, len(examples))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None}


def _check_model(build, world, *, lora: bool = False) -> dict:
    """Two SGD steps of the plain path (one process, unsharded) and of every fast path under
    FSDP2 on this rank's share; returns what differs (nothing when all is well)."""
    from preftune.distributed import shard, share
    from preftune.models import enable_activation_checkpointing

    examples = _examples(STEPS * BATCH)
    plain = build(seed=0).train()
    reference_plain = build(seed=1)
    if lora:
        import peft

        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                 task_type="CAUSAL_LM")
        plain = peft.get_peft_model(plain, config)
        for n, p in plain.named_parameters():  # non-zero adapters: the reference differs
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        reference_plain = None
    policy = copy.deepcopy(plain)
    enable_activation_checkpointing(policy)
    policy = shard(policy, world, train=True)
    reference = shard(copy.deepcopy(reference_plain), world, train=False) if not lora else None
    requested = FastPaths(pad_token_id=0, chunk_size=5, attention_kernel="segment")
    fast = decide_fast_paths(requested, [policy, reference], max_length=64)
    problems = []
    eager = policy.config._attn_implementation == "eager"  # 4D masks, not segments
    if fast != dataclasses.replace(requested, segments=not eager):
        problems.append(f"decided {fast}")
    sgd = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
           for m in (plain, policy)]
    kept_blocks = []
    for step in range(STEPS):
        examples_step = examples[step * BATCH:(step + 1) * BATCH]
        inner = policy.get_base_model() if lora else policy
        recompute._MEASURED.pop(inner, None)  # measured again when blocks are kept
        want_loss, want_grads = _plain_step(plain, reference_plain, examples_step, lora)
        mine = share(examples_step, world)
        loss = torch.zeros(())
        _spare_seen.clear()
        for i in range(0, len(mine), MICRO):
            last = i + MICRO >= len(mine)
            # Step 2 accumulates unsharded between reductions (no gradient sync).
            policy.set_requires_gradient_sync(last or step == 0)
            batch = fast.collate(mine[i:i + MICRO])
            with torch.no_grad():
                if lora:
                    with policy.disable_adapter():
                        ref = batch_logps(policy, batch, fast)
                else:
                    ref = batch_logps(reference, batch, fast)
            pol = batch_logps(policy, batch, fast)
            micro = _dpo(pol, ref, len(examples_step))
            (micro * world.size).backward()
            loss += micro.detach()
        torch.distributed.all_reduce(loss)
        mine_bytes = sum(p.to_local().numel() * 4 for p in policy.parameters() if p.requires_grad)
        # This rank's gradient shards, all missing in the first micro-batch (after the
        # reference's pass), none in the second: reduced (step 1) or accumulating (step 2).
        if _spare_seen != [mine_bytes, 0]:
            problems.append(f"step {step}: spare bytes {_spare_seen}, expected "
                            f"[{mine_bytes}, 0]")
        if abs(loss.item() - want_loss) > 1e-5:
            problems.append(f"step {step}: loss {loss.item()} != {want_loss}")
        got_grads = {n: p.grad.full_tensor() for n, p in policy.named_parameters()
                     if p.grad is not None}
        if got_grads.keys() != want_grads.keys():
            problems.append(f"step {step}: gradients of {sorted(got_grads)} not "
                            f"{sorted(want_grads)}")
        for n in want_grads.keys() & got_grads.keys():
            scale = want_grads[n].abs().max().item()
            if not torch.allclose(got_grads[n], want_grads[n], rtol=1e-5,
                                  atol=1e-5 * scale + 1e-7):
                err = (got_grads[n] - want_grads[n]).abs().max().item()
                problems.append(f"step {step}: gradient of {n} off by {err:.3g}")
        for opt in sgd:
            opt.step()
            opt.zero_grad(set_to_none=True)
        kept_blocks.append(inner in recompute._MEASURED)
    for (n, want), got in zip(plain.state_dict().items(), policy.state_dict().values(),
                              strict=True):
        got = got.full_tensor() if hasattr(got, "full_tensor") else got
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            problems.append(f"final weight {n} off by {(got - want).abs().max().item():.3g}")
    return {"problems": problems, "kept_blocks": kept_blocks}


def _check_mixed_precision(world) -> list[str]:
    """bf16 compute over float32 shards, as on GPUs (forced here on CPU), on the tied model:
    the fast paths agree with the plain path through the same sharded model within bf16
    rounding (and the segment plan survives FSDP2's cast of every block's inputs)."""
    import torch.distributed.fsdp as fsdp

    from preftune.data import collate_pairs
    from preftune.distributed import shard, share

    real = fsdp.fully_shard

    def bf16(module, **kw):
        kw.setdefault("mp_policy", fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                             reduce_dtype=torch.float32))
        return real(module, **kw)

    base, grads = tiny_qwen2_tied().train(), {}
    fsdp.fully_shard = bf16
    try:
        for name, requested in (("fast", FastPaths(pad_token_id=0, chunk_size=5)),
                                ("plain", None)):
            model = shard(copy.deepcopy(base), world, train=True)
            fast = decide_fast_paths(requested, [model], max_length=64)
            mine = share(_examples(BATCH), world)
            for i in range(len(mine)):  # accumulated unsharded in float32 between reductions
                model.set_requires_gradient_sync(i == len(mine) - 1)
                batch = (fast.collate if fast else partial(collate_pairs, pad_token_id=0))(
                    mine[i:i + 1])
                pol = batch_logps(model, batch, fast)
                ((pol.chosen - 0.5 * pol.rejected).sum() * world.size).backward()
            grads[name] = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    finally:
        fsdp.fully_shard = real
    found = {n: ((grads["fast"][n] - want).norm() / want.norm()).item()
             for n, want in grads["plain"].items()}
    return [f"bf16: gradient of {n} off by {rel:.3g} (relative)" for n, rel in found.items()
            if rel > 3e-2]


class _Shapes(TorchDispatchMode):
    """The shape of every tensor an op produces, forward and backward (local shards)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _vocabulary_sized(world) -> list[str]:
    """Under FSDP2 the chunked head makes nothing vocabulary-sized larger than one chunk of
    logits or the gathered [V, H] head weight, forward and backward; the plain path (the
    control) makes [rows, T, V] logits."""
    from preftune.data import collate_pairs
    from preftune.distributed import shard, share

    chunk, problems = 5, []
    mine = share(_examples(2 * BATCH), world)
    for name, requested in (("fast", FastPaths(pad_token_id=0, chunk_size=chunk,
                                               attention_kernel="segment")), ("plain", None)):
        model = shard(tiny_llama(VOCAB, seed=0).train(), world, train=True)
        fast = decide_fast_paths(requested, [model], max_length=64)
        batch = fast.collate(mine) if fast else collate_pairs(mine, 0)
        with _Shapes() as mode:
            out = batch_logps(model, batch, fast)
            (out.chosen.sum() - out.rejected.sum()).backward()
        limit = max(chunk * VOCAB, model.lm_head.weight.numel())  # numel: the unsharded one
        big = [s for s in mode.shapes if VOCAB in s and math.prod(s) > limit]
        if (name == "fast") == bool(big):
            problems.append(f"{name}: vocabulary-sized tensors {big[:3]}")
    return problems


def _worker(settings: dict) -> None:
    """Every check on each model, then a whole run (``settings``) in these two processes."""
    from preftune.distributed import init_world

    warnings.simplefilter("error", FastpathFallbackWarning)
    torch.set_num_threads(1)
    world = init_world("cpu")
    recompute.spare_bytes = _spare_bytes_seen
    results = {
        "llama": _check_model(lambda seed: tiny_llama(VOCAB, seed=seed), world),
        "qwen2-tied": _check_model(tiny_qwen2_tied, world),
        "llama-lora-eager": _check_model(
            lambda seed: tiny_llama(VOCAB, seed=seed, attn_implementation="eager"), world,
            lora=True),
    }
    recompute.spare_bytes = _SPARE_BYTES
    results["bf16"] = {"problems": _check_mixed_precision(world), "kept_blocks": None}
    results["vocabulary"] = {"problems": _vocabulary_sized(world), "kept_blocks": None}
    if world.main:
        print("RESULTS " + json.dumps(results), flush=True)
    train(DPOConfig(**settings), progress=False)  # closes the process group


# ----------------------------------------------------------------------------- tests


def _run_settings(model: Path, out: Path) -> dict:
    """A tied-embedding model with every fast path and the precomputed reference (defaults)."""
    return {"max_length": 48, "max_prompt_length": 24, "eval_examples": 4, "n_samples": 0,
            "warmup_steps": 0, "eval_every": 0, "save_every": 0, "batch_size": 4,
            "micro_batch_size": 1, "max_examples": 8, "max_steps": 2, "lr": 1e-3,
            "optimizer": "adamw", "dataset": str(HH_HELPFUL), "model": str(model),
            "output_dir": str(out)}


@pytest.fixture(scope="module")
def launched(tmp_path_factory, gpt2_tokenizer) -> tuple[subprocess.CompletedProcess, Path]:
    """One torchrun launch of this file's worker: (the process, the tied model's folder)."""
    tmp = tmp_path_factory.mktemp("fsdp-fast")
    model = tmp / "qwen2-tied"
    tiny_qwen2_tied(len(gpt2_tokenizer)).save_pretrained(model)
    gpt2_tokenizer.save_pretrained(model)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT),
                                          os.environ.get("PYTHONPATH", "")])}
    settings = json.dumps(_run_settings(model, tmp / "two"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", "-m", "tests.test_fastpath_fsdp", settings],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, model


def test_fast_paths_under_fsdp_equal_the_plain_path(launched):
    proc, _ = launched
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULTS "))
    results = json.loads(line.removeprefix("RESULTS "))
    for name, found in results.items():
        assert found["problems"] == [], name
        # activations kept in each step's first micro-batch, under FSDP2 too
        assert found["kept_blocks"] in ([True, True], None), name


def test_two_fsdp_processes_with_fast_paths_match_one(launched, tmp_path, monkeypatch, capsys):
    """The tied model's run in the launch against the same run in this process (no FSDP)."""
    proc, model = launched
    two = Path(json.loads(proc.args[-1])["output_dir"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the reference pass runs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: on busy shared cores a second thread only waits
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FastpathFallbackWarning)
            one = train(DPOConfig(**_run_settings(model, tmp_path / "one")), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert "preftune.fastpath" not in proc.stderr  # no fallback, on any rank
    for err in (proc.stderr, capsys.readouterr().err):
        assert "reference log-probs of 8 train pairs: computed and cached" in err
    _close(_train_records(one), _train_records(two))
    a, b = (load_file(run / "final" / "model.safetensors") for run in (one, two))
    # the gathered export stores the tied weight once, as the unsharded one does
    assert a.keys() == b.keys() and "lm_head.weight" not in b
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_plan_survives_fsdp_input_casting():
    """FSDP2's mixed-precision input cast rebuilds a dataclass argument per block: the calls
    of every copy count in the plan the fast path checks."""
    from torch.distributed.utils import _apply_to_tensors

    plan = Plan(((0, 3, 2, 1),))
    copy_ = _apply_to_tensors(lambda t: t.to(torch.bfloat16), {"preftune_plan": plan})
    copy_["preftune_plan"].count.n += 1
    assert copy_["preftune_plan"] is not plan and plan.calls == 1


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
