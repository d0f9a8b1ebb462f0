"""Speed and peak memory of one DPO training step: preftune vs TRL's ``DPOTrainer``.

Same model, same HH-RLHF helpful-base test pairs, same pairs per step, same dtype. Each
competitor runs in a fresh subprocess of this script, so its peak memory is its own; the parent
measures the machine's matmul rate, collects the children's JSON and prints one table.

* ``preftune``: the default ``preftune dpo`` step (``--set key=value`` changes a config key)
  with micro_batch_size = batch size: the ``DPOObjective`` fast path (chunked log-probs, shared
  prompt, packing) on a batch carrying precomputed reference log-probs, activation
  checkpointing, backward, gradient clipping, the optimizer step. The one-off reference
  precompute is timed separately.
* ``trl``: ``DPOTrainer`` with its defaults (AdamW, reference forward at every step) except
  gradient checkpointing off and the dtype below; steps timed with a ``TrainerCallback``.
* ``trl-precompute``: the same with ``precompute_ref_log_probs=True`` (done in ``__init__``).

The first ``--warmup`` steps of every method are not timed. "tokens" per pair are prompt +
chosen + rejected tokens actually used after each method's truncation (the prompt once); model
FLOP utilisation = 6 x parameters x tokens per step / (median step time x matmul rate).

    # CPU, fp32, SmolLM2-135M-Instruct (the README table)
    python benchmarks/bench_dpo_vs_trl.py --steps 3 --pairs 4 --max-length 512
    # one GPU, pure bf16, a random Qwen2.5-0.5B-shaped model at 1024 tokens
    python benchmarks/bench_dpo_vs_trl.py --device cuda --dtype bfloat16 \
        --model random-qwen2.5-0.5b --max-length 1024 --max-prompt-length 512 --pairs 8 \
        --steps 5 --warmup 2 --matmul-n 8192 --peak-tflops 989 [--set compile=true]

Needs ``trl`` (the ``bench`` extra). Note: TRL 1.x has no ``max_prompt_length``; it cuts
prompt + completion to ``max_length`` keeping the start, while preftune first shortens the
prompt to ``max_prompt_length`` (keeping the end for HH). Both token counts are reported.
"""

from __future__ import annotations

import argparse
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

from random_models import SHAPES, build_random

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


def matmul_gflops(n: int = 2048, repeats: int = 7, device: str = "cpu",
                  dtype: str = "float32") -> float:
    """Median rate of an n x n matmul in ``dtype`` on ``device``, in GFLOP/s (2 n^3 flops)."""
    import torch

    kind = getattr(torch, dtype)
    a = torch.randn(n, n, device=device, dtype=kind)
    b = torch.randn(n, n, device=device, dtype=kind)
    torch.matmul(a, b)  # warmup
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def dtype_of(args: argparse.Namespace):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]


def sync(args: argparse.Namespace) -> None:
    if args.device == "cuda":
        import torch

        torch.cuda.synchronize()


def device_peak_mib(args: argparse.Namespace) -> float | None:
    if args.device != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def reset_device_peak(args: argparse.Namespace) -> None:
    if args.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


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
    from preftune.config import DPOConfig, parse_config
    from preftune.data import pad_id_for, tokenize_pair
    from preftune.distributed import World
    from preftune.models import (
        compile_blocks,
        enable_activation_checkpointing,
        load_model,
        load_tokenizer,
    )
    from preftune.reference import PrecomputedReference, attach, compute_reference_logps
    from preftune.train import (
        build_objective,
        make_state,
        micro_batches,
        train_step,
        with_fast_paths,
    )

    # The default `preftune dpo` settings, with any --set overrides; one micro-batch a step.
    cfg = parse_config(DPOConfig, [f"model={args.model}", f"dataset={HH}", *args.set,
                                   f"batch_size={args.pairs}", f"micro_batch_size={args.pairs}",
                                   f"max_length={args.max_length}",
                                   f"max_prompt_length={args.max_prompt_length}"])
    tokenizer = load_tokenizer(args.model)
    pad = pad_id_for(tokenizer)
    examples = [tokenize_pair(p, tokenizer, max_length=args.max_length,
                              max_prompt_length=args.max_prompt_length)
                for p in load_pairs(args.pairs)]
    policy = load_model(args.model, dtype=dtype_of(args)).to(args.device)
    policy.train()
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(policy)
    # As the training loop: fast paths decided once for the model, batches laid out by collate.
    objective = with_fast_paths(build_objective(cfg, pad), [policy], args.max_length)
    world = World(device=torch.device(args.device))
    state = make_state(cfg, world, policy, PrecomputedReference(None), objective, pad,
                       total_steps=args.warmup + args.steps)

    # One-off: the frozen reference's log-probs (as preftune.train.precompute_reference, no
    # cache): the reference is the policy's starting point, so the policy computes them itself.
    t = time.perf_counter()
    policy.eval()
    logps = compute_reference_logps(
        policy, examples,
        lambda exs: micro_batches(exs, args.pairs, state.collate, world.device),
        logps=objective.sequence_logps)
    policy.train()
    precompute_s = time.perf_counter() - t
    examples = attach(examples, logps)
    if cfg.compile:
        compile_blocks(policy)

    def step() -> float:
        sync(args)
        start = time.perf_counter()
        train_step(state, examples)  # the training loop's step, as `preftune dpo` runs it
        sync(args)
        return time.perf_counter() - start

    warmup = [step() for _ in range(args.warmup)]
    reset = reset_peak_rss()
    reset_device_peak(args)
    times = [step() for _ in range(args.steps)]
    step_peak = peak_rss_mib() if reset else None

    prompt = sum(len(e["prompt_input_ids"]) for e in examples)
    chosen = sum(len(e["chosen_input_ids"]) - len(e["prompt_input_ids"]) for e in examples)
    rejected = sum(len(e["rejected_input_ids"]) - len(e["prompt_input_ids"]) for e in examples)
    return {"times": times, "warmup_s": warmup, "step_peak_mib": step_peak,
            "device_peak_mib": device_peak_mib(args),
            "tokens": prompt + chosen + rejected, "prompt_tokens": prompt,
            "sequence_tokens": 2 * prompt + chosen + rejected,
            "params": sum(p.numel() for p in policy.parameters()),
            "setup": {"reference_precompute_s": precompute_s}}


class StepTimer:
    """A TrainerCallback (built lazily: transformers is imported only in the child)."""

    def __new__(cls, bench: argparse.Namespace):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []
                self.first_begin: float | None = None
                self.step_peak: float | None = None
                self.device_peak: float | None = None
                self._reset = False
                self._t = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                if self.first_begin is None:
                    self.first_begin = time.perf_counter()
                if len(self.times) == bench.warmup and not self._reset:  # after the warmup
                    self._reset = reset_peak_rss()
                    reset_device_peak(bench)
                sync(bench)
                self._t = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                sync(bench)
                self.times.append(time.perf_counter() - self._t)
                if self._reset:
                    self.step_peak = peak_rss_mib()
                    self.device_peak = device_peak_mib(bench)

        return _Timer()


def run_trl(args: argparse.Namespace, precompute: bool) -> dict:
    setup_torch()
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from preftune.models import load_model, load_tokenizer

    pairs = load_pairs(args.pairs)
    dataset = Dataset.from_dict({"prompt": [p.prompt for p in pairs],
                                 "chosen": [p.chosen for p in pairs],
                                 "rejected": [p.rejected for p in pairs]})
    tokenizer = load_tokenizer(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(args.model, dtype=dtype_of(args))
    timer = StepTimer(args)
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=args.pairs,
            gradient_accumulation_steps=1, max_steps=args.steps + args.warmup,
            max_length=args.max_length, bf16=False, fp16=False, gradient_checkpointing=False,
            use_cpu=args.device == "cpu",
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
    return {"times": timer.times[args.warmup:], "warmup_s": timer.times[:args.warmup],
            "step_peak_mib": timer.step_peak, "device_peak_mib": timer.device_peak,
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
                  load=[load_before, os.getloadavg()[0]],
                  gflops_after=matmul_gflops(args.matmul_n, device=args.device, dtype=args.dtype),
                  warnings=sorted({f"{w.category.__name__}: {str(w.message)[:160]}"
                                   for w in caught}))
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------ parent


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def parent(args: argparse.Namespace) -> None:
    setup_torch()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model in SHAPES:
            args.model = build_random(args.model, Path(tmp) / args.model)
        _parent(args)


def _parent(args: argparse.Namespace) -> None:
    gflops = matmul_gflops(args.matmul_n, device=args.device, dtype=args.dtype)
    where = f"{THREADS} threads" if args.device == "cpu" else _gpu_name()
    print(f"{args.dtype} matmul {args.matmul_n}x{args.matmul_n} on {args.device}: "
          f"{gflops:.1f} GFLOP/s (median of 7, {where}); "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, dict] = {}
    # Rounds run the methods in turn (A B C A B C ...), so a drift in the machine's speed
    # reaches every method alike; each method's steps of all rounds are pooled.
    for rnd in range(args.rounds):
        for method in args.methods:
            print(f"running {method}" + (f" (round {rnd + 1})" if args.rounds > 1 else "")
                  + " ...", flush=True)
            r = _run_child(args, method)
            if r is None:
                continue
            print(f"  done in {r['wall_s']:.0f} s; steps {[round(x, 2) for x in r['times']]}; "
                  f"load {r['load'][0]:.1f}->{r['load'][1]:.1f}; setup "
                  + ", ".join(f"{k} {v:.1f}s" for k, v in r["setup"].items()), flush=True)
            for w in r["warnings"]:
                print(f"    warning: {w}")
            r["round_medians"] = [statistics.median(r["times"])]
            results[method] = _pool(results.get(method), r)
    for r in results.values():
        r["median_s"] = statistics.median(r["times"])

    print(f"\n{Path(args.model).name}, {args.pairs} pairs/step, max_length {args.max_length}, "
          f"max_prompt_length {args.max_prompt_length} (preftune only), {args.dtype} on "
          f"{args.device}, TRL without grad checkpointing, preftune "
          f"{' '.join(args.set) or 'defaults'}, {args.steps} timed steps after {args.warmup} "
          f"warmup x {args.rounds} round(s); matmul {gflops:.1f} GFLOP/s\n")
    head = (f"{'method':<15}{'median s/step':>14}{'pairs/s':>9}{'tokens/step':>12}"
            f"{'tokens/s':>10}{'MFU':>7}{'peak RSS MiB':>14}{'step peak MiB':>15}"
            f"{'GPU peak MiB':>14}")
    print(head)
    print("-" * len(head))
    for method, r in results.items():
        mfu = 6 * r["params"] * r["tokens"] / (r["median_s"] * gflops * 1e9)
        r["mfu"] = mfu
        if args.peak_tflops:
            r["mfu_nominal"] = mfu * gflops / (args.peak_tflops * 1e3)
        print(f"{method:<15}{r['median_s']:>14.2f}{args.pairs / r['median_s']:>9.3f}"
              f"{r['tokens']:>12d}{r['tokens'] / r['median_s']:>10.1f}{mfu:>7.1%}"
              f"{r['peak_rss_mib']:>14.0f}{fmt(r['step_peak_mib'], '.0f'):>15}"
              f"{fmt(r['device_peak_mib'], '.0f'):>14}")
    if args.peak_tflops:
        print("MFU against the nominal peak of " f"{args.peak_tflops:g} TFLOP/s: " + ", ".join(
            f"{m} {r['mfu_nominal']:.1%}" for m, r in results.items()))
    if "preftune" in results:
        pt = results["preftune"]
        print(f"\npreftune one-off reference precompute ({args.pairs} pairs): "
              f"{pt['setup']['reference_precompute_s']:.2f} s")
        for name in ("trl", "trl-precompute"):
            if name in results:
                o = results[name]
                print(f"preftune vs {name}: {o['median_s'] / pt['median_s']:.2f}x faster per step "
                      f"({(pt['tokens'] / pt['median_s']) / (o['tokens'] / o['median_s']):.2f}x "
                      f"tokens/s), peak RSS {pt['peak_rss_mib'] / o['peak_rss_mib']:.2f}x "
                      f"of {name}'s, step-phase peak "
                      f"{fmt(_ratio(pt['step_peak_mib'], o['step_peak_mib']), '.2f')}x"
                      + (f", GPU peak {pt['device_peak_mib'] / o['device_peak_mib']:.2f}x"
                         if pt["device_peak_mib"] and o["device_peak_mib"] else ""))
                ours, theirs = pt["round_medians"], o["round_medians"]
                if len(ours) > 1 and len(ours) == len(theirs):
                    # each round runs the methods back to back: its ratio sees one machine speed
                    paired = [b / a for a, b in zip(ours, theirs, strict=True)]
                    print(f"  speed-up per round: {', '.join(f'{x:.2f}x' for x in paired)} "
                          f"(median {statistics.median(paired):.2f}x)")
    if "trl-precompute" in results and "trl" in results:
        d = (results["trl-precompute"]["setup"]["trainer_init_s"]
             - results["trl"]["setup"]["trainer_init_s"])
        print(f"trl-precompute: DPOTrainer init {d:+.1f} s longer than trl's (its precompute)")
    if args.json:
        Path(args.json).write_text(json.dumps({"gflops": gflops, "results": results}, indent=1))


def _run_child(args: argparse.Namespace, method: str) -> dict | None:
    cmd = [sys.executable, __file__, "--only", method, "--steps", str(args.steps),
           "--pairs", str(args.pairs), "--max-length", str(args.max_length),
           "--max-prompt-length", str(args.max_prompt_length), "--model", args.model,
           "--device", args.device, "--dtype", args.dtype, "--warmup", str(args.warmup),
           "--matmul-n", str(args.matmul_n), *[f"--set={kv}" for kv in args.set]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(f"  {method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return None
    return json.loads(lines[-1][len("RESULT ") :])


def _pool(a: dict | None, b: dict) -> dict:
    """One method's results over rounds: all timed steps, the highest peaks."""
    if a is None:
        return b
    out = {**a, "times": a["times"] + b["times"],
           "round_medians": a["round_medians"] + b["round_medians"]}
    for key in ("peak_rss_mib", "step_peak_mib", "device_peak_mib"):
        values = [x for x in (a[key], b[key]) if x is not None]
        out[key] = max(values) if values else None
    return out


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=MODEL, help=f"a model folder, alias, or one of "
                    f"{', '.join(SHAPES)} (random weights, Qwen2.5 tokenizer; default {MODEL})")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="weights and compute of both (bfloat16: pure bf16, as preftune's "
                         "dtype=bfloat16 master_weights=bfloat16)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after the warmup)")
    ap.add_argument("--rounds", type=int, default=1, help="run the methods in turn this many "
                    "times and pool their timed steps (evens out drift in machine speed)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation)")
    ap.add_argument("--matmul-n", type=int, default=2048, help="size of the rate's matmul")
    ap.add_argument("--peak-tflops", type=float, help="also report MFU against this nominal "
                    "peak (H100 SXM dense bf16: 989)")
    ap.add_argument("--pairs", type=int, default=4, help="pairs per step (= micro-batch)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-prompt-length", type=int, default=256)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--only", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a preftune dpo config key (e.g. gradient_checkpointing=false)")
    args = ap.parse_args()
    if args.only:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
