"""The GPU check: one command, no downloads, every figure the GPU work needs, as JSON.

    python benchmarks/gpu_check.py                          # one CUDA GPU, a few minutes
    python benchmarks/gpu_check.py --device cpu --tiny      # the same plumbing on a CPU (CI)

On a random model in the Qwen2.5-0.5B shape (tied embeddings, the real Qwen2.5 tokenizer, from
``random_models.py``) and real HH-RLHF pairs:

  a. fast paths against the plain path (log-probs and gradients) in float32 and bfloat16, and
     the pair-layout attention kernel's backward against the segment path where it exists;
  b. ``preftune dpo`` under ``torchrun --nproc_per_node=1`` (FSDP2, all fast paths) against
     one plain process (fast paths off): the loss trajectories;
  c. the benchmark against TRL (``bench_dpo_vs_trl.py``: its default and with precomputed
     reference log-probs, when TRL is importable) at 1024 tokens, 8 pairs per step, bf16;
  d. everything into ``--out`` (default ``gpu_check.json``).

Exits non-zero when a comparison is outside its tolerance.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from random_models import ASSETS, build_random

HERE = Path(__file__).resolve().parent
HH = ASSETS / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
# |fast - plain| allowed, relative to the largest |plain| value: float32 only differs in the
# order of sums; bf16 rounds every matmul to 8 bits of mantissa (2^-8 = 3.9e-3).
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
LOSS_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}  # |loss difference| per training step


def pairs(tokenizer, n: int, max_length: int) -> list[dict]:
    """``n`` real HH pairs, tokenized as training does."""
    import itertools

    from preftune.data import read_pairs, tokenize_pair

    rows = itertools.islice(read_pairs(HH, "hh", quiet=True), n)
    return [tokenize_pair(p, tokenizer, max_length=max_length,
                          max_prompt_length=max_length // 2) for p in rows]


def fast_vs_plain(model_dir: str, device: str, dtype: str, n: int, max_length: int) -> dict:
    """(a) Log-probs and gradients of the fast paths (all on) against the plain path."""
    import torch
    from transformers import AutoTokenizer

    from preftune.data import collate_pairs
    from preftune.fastpath import FastPaths, batch_logps, decide_fast_paths
    from preftune.logprobs import concatenated_logps
    from preftune.models import load_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, dtype=getattr(torch, dtype)).to(device).train()
    examples = pairs(tokenizer, n, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fast = decide_fast_paths(FastPaths(pad_token_id=pad), [model], max_length)

    def run(use_fast: bool) -> tuple[torch.Tensor, list[torch.Tensor], float]:
        model.zero_grad(set_to_none=True)
        batch = fast.collate(examples) if use_fast else collate_pairs(examples, pad)
        batch = _to(batch, device)
        _sync(device)
        start = time.perf_counter()
        out = (batch_logps(model, batch, fast) if use_fast
               else concatenated_logps(model, batch))
        (out.chosen.sum() - out.rejected.sum()).backward()
        _sync(device)
        seconds = time.perf_counter() - start
        grads = [p.grad.detach().float().clone() for p in model.parameters()]
        return torch.cat([out.chosen, out.rejected]).detach().float(), grads, seconds

    run(True)  # warm up (kernels, compilation)
    plain, plain_grads, plain_s = run(False)
    got, grads, fast_s = run(True)
    scale = plain.abs().max().item()
    logp_err = (got - plain).abs().max().item() / scale
    grad_err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                   for a, b in zip(grads, plain_grads, strict=True))
    tol = TOLERANCE[dtype]
    result = {"dtype": dtype, "pairs": n, "max_length": max_length, "fast": fast.flags(),
              "fallbacks": list(fast.fallbacks), "logp_rel_err": logp_err,
              "grad_rel_err": grad_err, "tolerance": tol, "plain_s": plain_s, "fast_s": fast_s,
              "ok": logp_err <= tol and grad_err <= tol and not fast.fallbacks}
    print(f"(a) {dtype}: log-prob error {logp_err:.1e}, gradient error {grad_err:.1e} "
          f"(relative, tolerance {tol:.0e}); forward+backward {plain_s:.3f} s plain, "
          f"{fast_s:.3f} s fast; fallbacks {list(fast.fallbacks) or 'none'}", flush=True)
    return result


def kernel_backward(device: str) -> dict | None:
    """(a) The FlexAttention pair kernel against the segment path, forward and backward, in
    float32 (``flex_check.py``; CUDA only: FlexAttention has no backward on a CPU)."""
    if device != "cuda":
        return None
    import torch
    from flex_check import flex_backward_check

    result = {"float32": flex_backward_check(device),
              "bfloat16": flex_backward_check(device, dtype=torch.bfloat16)}
    f32 = result["float32"]
    result["ok"] = bool(f32["flex_calls"]) and max(f32["logps"], f32["loss"], f32["grad"]) <= 1e-4
    print(f"(a) attention kernel, flex against segment: {result}", flush=True)
    return result


def fsdp_vs_plain(model_dir: str, device: str, work: Path, steps: int, length: int) -> dict:
    """(b) FSDP2 (torchrun, one process, all fast paths) against one plain process."""
    common = [f"model={model_dir}", f"dataset={HH}", f"device={device}",
              f"max_steps={steps}", "batch_size=8", "micro_batch_size=4",
              f"max_length={length}", f"max_prompt_length={length // 2}", "eval_examples=8",
              "n_samples=0", "warmup_steps=0", "lr=1e-5", "optimizer=adamw", "eval_every=0",
              "save_every=0", f"max_examples={8 * steps}"]
    dtype = "bfloat16" if device == "cuda" else "float32"
    off = ["chunked_logps=false", "share_prompt=false", "pack=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plain, fsdp = work / "plain", work / "fsdp"
    _run([sys.executable, "-m", "preftune", "dpo", *common, *off, f"dtype={dtype}",
          f"output_dir={plain}"], env)
    log = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=1", "-m", "preftune", "dpo", *common, f"dtype={dtype}",
                f"output_dir={fsdp}"], env, capture=True)
    fallbacks = [line for line in log.splitlines() if "preftune.fastpath:" in line]
    a, b = _losses(plain), _losses(fsdp)
    worst = max(abs(x - y) for x, y in zip(a, b, strict=True))
    tol = LOSS_TOLERANCE[dtype]
    first = max(abs(a[0] - math.log(2)), abs(b[0] - math.log(2)))
    print(f"(b) {dtype} losses plain {[round(x, 5) for x in a]}\n"
          f"    fsdp2+fast   {[round(x, 5) for x in b]}\n"
          f"    max |difference| {worst:.1e} (tolerance {tol:.0e}); |first - ln 2| {first:.1e}; "
          f"fast-path fallbacks under FSDP2: {fallbacks or 'none'}", flush=True)
    return {"dtype": dtype, "plain": a, "fsdp": b, "max_abs_diff": worst, "tolerance": tol,
            "first_loss_vs_ln2": first, "fsdp_fallbacks": fallbacks,
            "ok": worst <= tol and first < 1e-3 and not fallbacks}


def benchmark(device: str, tiny: bool, work: Path) -> dict:
    """(c) The table against TRL (TRL's rows only when it is importable)."""
    methods = ["preftune"] + (["trl", "trl-precompute"] if importlib.util.find_spec("trl")
                              else [])
    out = work / "bench.json"
    if tiny:
        size = ["--model", "random-tiny", "--max-length", "64", "--max-prompt-length", "32",
                "--pairs", "2", "--steps", "1", "--warmup", "0", "--matmul-n", "256"]
    else:
        size = ["--model", "random-qwen2.5-0.5b", "--max-length", "1024",
                "--max-prompt-length", "512", "--pairs", "8", "--steps", "5", "--warmup", "2",
                "--matmul-n", "8192", "--set", "compile=true"]
    dtype = "bfloat16" if device == "cuda" else "float32"
    _run([sys.executable, str(HERE / "bench_dpo_vs_trl.py"), "--device", device, "--dtype",
          dtype, *size, "--methods", *methods, "--json", str(out)], dict(os.environ))
    result = json.loads(out.read_text())
    if "trl" not in methods:
        result["note"] = "TRL is not installed here: preftune's row only"
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and sizes (CPU plumbing)")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--skip", nargs="*", default=[], choices=["a", "b", "c"])
    args = ap.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; use --device cpu --tiny", file=sys.stderr)
            return 2
    start = time.perf_counter()
    report: dict = {"device": _device_name(args.device), "tiny": args.tiny}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        shape = "random-tiny" if args.tiny else "random-qwen2.5-0.5b"
        model_dir = build_random(shape, work / "model")
        length = 64 if args.tiny else 1024
        if "a" not in args.skip:
            dtypes = ["float32", "bfloat16"]
            report["fast_vs_plain"] = [fast_vs_plain(model_dir, args.device, d,
                                                     4 if args.tiny else 8, length)
                                       for d in dtypes]
            report["kernel_backward"] = kernel_backward(args.device)
        if "b" not in args.skip:
            report["fsdp_vs_plain"] = fsdp_vs_plain(model_dir, args.device, work,
                                                    2 if args.tiny else 5, length)
        if "c" not in args.skip:
            report["benchmark"] = benchmark(args.device, args.tiny, work)
    report["wall_s"] = time.perf_counter() - start
    checks = [*report.get("fast_vs_plain", []), report.get("fsdp_vs_plain"),
              report.get("kernel_backward")]
    report["ok"] = all(c["ok"] for c in checks if c is not None)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"gpu_check: {'all checks passed' if report['ok'] else 'CHECKS FAILED'} in "
          f"{report['wall_s']:.0f} s; {args.out}", flush=True)
    return 0 if report["ok"] else 1


def _to(batch, device: str):
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if hasattr(batch, "to"):
        return batch.to(device)
    return batch


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _run(cmd: list[str], env: dict, capture: bool = False) -> str:
    """Run ``cmd``; with ``capture``, echo and return its stderr (where warnings go)."""
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, check=False, env=env, text=True,
                          stderr=subprocess.PIPE if capture else None)
    if capture:
        sys.stderr.write(proc.stderr)
    if proc.returncode:
        raise SystemExit(f"gpu_check: {cmd[2:5]} failed with status {proc.returncode}")
    return proc.stderr or ""


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
