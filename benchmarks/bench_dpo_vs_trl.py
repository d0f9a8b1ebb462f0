"""Speed and peak memory of one DPO training step: preftune vs TRL's ``DPOTrainer`` (CPU, fp32).

Same model (SmolLM2-135M-Instruct), same HH-RLHF helpful-base test pairs, same pairs per step.
Each competitor runs in a fresh subprocess of this script, so its peak resident memory is its
own; the parent measures the machine's fp32 matmul rate, collects the children's JSON and
prints one table.

* ``preftune``: the default ``preftune dpo`` step with micro_batch_size = batch size: the
  ``DPOObjective`` fast path (chunked log-probs, shared prompt, packing) on a collated batch
  carrying precomputed reference log-probs, backward, ``clip_grad_norm_(10)``, RMSprop step.
  The one-off reference precompute is timed separately.
* ``trl``: ``DPOTrainer`` with its defaults (AdamW, reference forward at every step) except
  fp32 and gradient checkpointing off; steps timed with a ``TrainerCallback``.
* ``trl-precompute``: the same with ``precompute_ref_log_probs=True`` (done in ``__init__``).

The first step of every method is a warmup and is not timed. "tokens" per pair are prompt +
chosen + rejected tokens actually used after each method's truncation (the prompt once); model
FLOP utilisation = 6 x parameters x tokens per step / (median step time x matmul rate).

    .venv/bin/python benchmarks/bench_dpo_vs_trl.py --steps 3 --pairs 4 --max-length 512

Needs ``trl`` (the ``bench`` extra). Note: TRL 1.x has no ``max_prompt_length``; it cuts
prompt + completion to ``max_length`` keeping the start, while preftune first shortens the
prompt to ``max_prompt_length`` (keeping the end for HH). Both token counts are reported.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "assets" / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
MODEL = "smollm2-135m-instruct"
METHODS = ("preftune", "trl", "trl-precompute")
THREADS = 2


# --------------------------------------------------------------------------- measurement helpers


def peak_rss_mib() -> float:
    """Peak resident set of this process (VmHWM, resettable; ru_maxrss as a fallback)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def matmul_gflops(n: int = 2048, repeats: int = 7) -> float:
    """Median fp32 rate of an n x n matmul, in GFLOP/s (2 n^3 flops each)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warmup
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def load_pairs(n: int):
    from preftune.data import read_pairs

    return list(itertools.islice(read_pairs(HH, "hh", quiet=True), n))


def setup_torch():
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    return torch


# ------------------------------------------------------------------------------------ competitors


def run_preftune(args: argparse.Namespace) -> dict:
    torch = setup_torch()
    from preftune.data import collate_pairs, pad_id_for, tokenize_pair
    from preftune.models import load_model, load_tokenizer
    from preftune.reference import attach, compute_reference_logps
    from preftune.step import DPOObjective

    tokenizer = load_tokenizer(MODEL)
    pad = pad_id_for(tokenizer)
    examples = [tokenize_pair(p, tokenizer, max_length=args.max_length,
                              max_prompt_length=args.max_prompt_length)
                for p in load_pairs(args.pairs)]
    objective = DPOObjective(beta=0.1, fast={"pad_token_id": pad, "chunked": True,
                                             "chunk_size": 1024, "share_prompt": True,
                                             "pack": True})
    policy = load_model(MODEL, dtype=torch.float32)
    policy.train()

    # One-off: the frozen reference's log-probs (as preftune.train.precompute_reference, no cache).
    t = time.perf_counter()
    reference = load_model(MODEL, dtype=torch.float32)
    reference.eval().requires_grad_(False)
    load_s = time.perf_counter() - t

    def batches(exs):
        for i in range(0, len(exs), args.pairs):
            yield collate_pairs(exs[i : i + args.pairs], pad)

    t = time.perf_counter()
    logps = compute_reference_logps(reference, examples, batches, logps=objective.sequence_logps)
    precompute_s = time.perf_counter() - t
    examples = attach(examples, logps)
    del reference
    gc.collect()

    optimizer = torch.optim.RMSprop([p for p in policy.parameters() if p.requires_grad], lr=5e-7)

    def step() -> float:
        start = time.perf_counter()
        batch = collate_pairs(examples, pad)
        loss, _ = objective(policy, None, batch, objective.denominator(examples))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    warmup = step()
    reset = reset_peak_rss()
    times = [step() for _ in range(args.steps)]
    step_peak = peak_rss_mib() if reset else None

    prompt = sum(len(e["prompt_input_ids"]) for e in examples)
    chosen = sum(len(e["chosen_input_ids"]) - len(e["prompt_input_ids"]) for e in examples)
    rejected = sum(len(e["rejected_input_ids"]) - len(e["prompt_input_ids"]) for e in examples)
    return {"times": times, "warmup_s": warmup, "step_peak_mib": step_peak,
            "tokens": prompt + chosen + rejected, "prompt_tokens": prompt,
            "sequence_tokens": 2 * prompt + chosen + rejected,
            "params": sum(p.numel() for p in policy.parameters()),
            "setup": {"reference_load_s": load_s, "reference_precompute_s": precompute_s}}


class StepTimer:
    """A TrainerCallback (built lazily: transformers is imported only in the child)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []
                self.first_begin: float | None = None
                self.step_peak: float | None = None
                self._reset = False
                self._t = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                if self.first_begin is None:
                    self.first_begin = time.perf_counter()
                if len(self.times) == 1 and not self._reset:  # after the warmup step
                    self._reset = reset_peak_rss()
                self._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                self.times.append(time.perf_counter() - self._t)
                if self._reset:
                    self.step_peak = peak_rss_mib()

        return _Timer()


def run_trl(args: argparse.Namespace, precompute: bool) -> dict:
    torch = setup_torch()
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from preftune.models import load_model, load_tokenizer

    pairs = load_pairs(args.pairs)
    dataset = Dataset.from_dict({"prompt": [p.prompt for p in pairs],
                                 "chosen": [p.chosen for p in pairs],
                                 "rejected": [p.rejected for p in pairs]})
    tokenizer = load_tokenizer(MODEL)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(MODEL, dtype=torch.float32)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=args.pairs,
            gradient_accumulation_steps=1, max_steps=args.steps + 1, max_length=args.max_length,
            bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
            precompute_ref_log_probs=precompute, report_to="none", save_strategy="no",
            logging_steps=10**6, dataloader_num_workers=0, disable_tqdm=True, seed=0)
        t = time.perf_counter()
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[timer])
        init_s = time.perf_counter() - t
        t = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t
        rows = trainer.train_dataset
        prompt = tokens = seq = 0
        for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"],
                           strict=True):
            pc, pr = min(len(p) + len(c), args.max_length), min(len(p) + len(r), args.max_length)
            kept = min(len(p), args.max_length)
            prompt += kept
            tokens += kept + (pc - kept) + (pr - kept)
            seq += pc + pr
    return {"times": timer.times[1:], "warmup_s": timer.times[0], "step_peak_mib": timer.step_peak,
            "tokens": tokens, "prompt_tokens": prompt, "sequence_tokens": seq,
            "params": sum(p.numel() for p in model.parameters()),
            "setup": {"trainer_init_s": init_s,
                      "train_call_to_first_step_s": timer.first_begin - t,
                      "train_call_s": train_s}}


def child(args: argparse.Namespace) -> None:
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.only == "preftune":
            result = run_preftune(args)
        else:
            result = run_trl(args, precompute=args.only == "trl-precompute")
    result.update(method=args.only, wall_s=time.perf_counter() - t,
                  peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  load=[load_before, os.getloadavg()[0]], gflops_after=matmul_gflops(),
                  warnings=sorted({f"{w.category.__name__}: {str(w.message)[:160]}"
                                   for w in caught}))
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------ parent


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def parent(args: argparse.Namespace) -> None:
    setup_torch()
    gflops = matmul_gflops()
    print(f"fp32 matmul 2048x2048: {gflops:.1f} GFLOP/s (median of 7, {THREADS} threads); "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    for method in args.methods:
        cmd = [sys.executable, __file__, "--only", method, "--steps", str(args.steps),
               "--pairs", str(args.pairs), "--max-length", str(args.max_length),
               "--max-prompt-length", str(args.max_prompt_length)]
        print(f"running {method} ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"  {method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            continue
        results[method] = r = json.loads(lines[-1][len("RESULT ") :])
        r["median_s"] = statistics.median(r["times"])
        print(f"  done in {r['wall_s']:.0f} s; steps {[round(x, 2) for x in r['times']]}; "
              f"load {r['load'][0]:.1f}->{r['load'][1]:.1f}; setup "
              + ", ".join(f"{k} {v:.1f}s" for k, v in r["setup"].items()), flush=True)
        for w in r["warnings"]:
            print(f"    warning: {w}")

    print(f"\n{args.pairs} pairs/step, max_length {args.max_length}, max_prompt_length "
          f"{args.max_prompt_length} (preftune only), fp32, no grad checkpointing, "
          f"{THREADS} threads, {args.steps} timed steps after 1 warmup; "
          f"matmul {gflops:.1f} GFLOP/s\n")
    head = (f"{'method':<15}{'median s/step':>14}{'pairs/s':>9}{'tokens/step':>12}"
            f"{'tokens/s':>10}{'MFU':>7}{'peak RSS MiB':>14}{'step peak MiB':>15}")
    print(head)
    print("-" * len(head))
    for method, r in results.items():
        mfu = 6 * r["params"] * r["tokens"] / (r["median_s"] * gflops * 1e9)
        r["mfu"] = mfu
        print(f"{method:<15}{r['median_s']:>14.2f}{args.pairs / r['median_s']:>9.3f}"
              f"{r['tokens']:>12d}{r['tokens'] / r['median_s']:>10.1f}{mfu:>7.1%}"
              f"{r['peak_rss_mib']:>14.0f}{fmt(r['step_peak_mib'], '.0f'):>15}")
    if "preftune" in results:
        pt = results["preftune"]
        print(f"\npreftune one-off reference precompute ({args.pairs} pairs): "
              f"{pt['setup']['reference_precompute_s']:.2f} s "
              f"(+ {pt['setup']['reference_load_s']:.2f} s loading the reference)")
        for name in ("trl", "trl-precompute"):
            if name in results:
                o = results[name]
                print(f"preftune vs {name}: {o['median_s'] / pt['median_s']:.2f}x faster per step "
                      f"({(pt['tokens'] / pt['median_s']) / (o['tokens'] / o['median_s']):.2f}x "
                      f"tokens/s), peak RSS {pt['peak_rss_mib'] / o['peak_rss_mib']:.2f}x "
                      f"of {name}'s, step-phase peak "
                      f"{fmt(_ratio(pt['step_peak_mib'], o['step_peak_mib']), '.2f')}x")
    if "trl-precompute" in results and "trl" in results:
        d = (results["trl-precompute"]["setup"]["trainer_init_s"]
             - results["trl"]["setup"]["trainer_init_s"])
        print(f"trl-precompute: DPOTrainer init {d:+.1f} s longer than trl's (its precompute)")
    if args.json:
        Path(args.json).write_text(json.dumps({"gflops": gflops, "results": results}, indent=1))


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after 1 warmup step)")
    ap.add_argument("--pairs", type=int, default=4, help="pairs per step (= micro-batch)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-prompt-length", type=int, default=256)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--only", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args()
    if args.only:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
