"""Check the FSDP2 path against the plain path on one GPU (or, tiny, on the CPU).

    python benchmarks/fsdp_gpu_check.py                 # one GPU: dtype=bfloat16, plain vs FSDP2
    python benchmarks/fsdp_gpu_check.py --device cpu    # the same plumbing at a tiny size

Builds a randomly initialised Qwen2-style model (with the Qwen2.5 tokenizer from
../shared/assets unless --model is given), runs a few DPO steps with `preftune dpo` in one
process and under `torchrun --nproc_per_node=1` (FSDP2), and compares the loss trajectories.
Exits non-zero when they disagree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from random_models import ASSETS, build_random


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--model", help="a model folder (default: a random Qwen2-style model)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tolerance", type=float, default=None,
                    help="max |loss difference| (default: 0.02 on cuda/bf16, 1e-5 on cpu)")
    args = ap.parse_args()
    tol = args.tolerance or (0.02 if args.device == "cuda" else 1e-5)
    work = Path(tempfile.mkdtemp(prefix="fsdp-check-"))
    model = args.model or str(work / "model")
    if not args.model:
        build_random("random-qwen2.5-0.5b" if args.device == "cuda" else "random-tiny",
                     Path(model))
    length = 1024 if args.device == "cuda" else 64
    common = [f"model={model}", f"dataset={ASSETS / 'data/hh-rlhf/helpful-base/test.jsonl.gz'}",
              f"device={args.device}", f"max_steps={args.steps}", "batch_size=8",
              "micro_batch_size=4", f"max_length={length}", f"max_prompt_length={length // 2}",
              "eval_examples=8", "n_samples=0", "warmup_steps=0", "lr=1e-5",
              "optimizer=adamw", "eval_every=0", "save_every=0", f"max_examples={8 * args.steps}"]
    # Both float32 master weights and bf16 compute on GPU: autocast in one process, FSDP2's
    # bf16 gathered weights under torchrun (preftune.precision); float32 on CPU.
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run([sys.executable, "-m", "preftune", "dpo", *common, f"dtype={dtype}",
         f"output_dir={work / 'plain'}"])
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=1", "-m", "preftune", "dpo", *common, f"dtype={dtype}",
                    f"output_dir={work / 'fsdp'}"], check=True, env=env)
    a, b = losses(work / "plain"), losses(work / "fsdp")
    worst = max(abs(x - y) for x, y in zip(a, b, strict=True))
    print(f"{'step':>4} {'plain':>10} {'fsdp2':>10}")
    for i, (x, y) in enumerate(zip(a, b, strict=True), 1):
        print(f"{i:>4} {x:>10.5f} {y:>10.5f}")
    first_ok = abs(a[0] - math.log(2)) < 1e-3 and abs(b[0] - math.log(2)) < 1e-3
    print(f"max |difference| {worst:.2e} (tolerance {tol:.0e}); first loss ln 2: {first_ok}")
    return 0 if worst <= tol and first_ok else 1


if __name__ == "__main__":
    sys.exit(main())
