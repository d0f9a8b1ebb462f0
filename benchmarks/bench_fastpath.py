"""Time and peak memory of the DPO log-probs: plain ``concatenated_logps`` vs ``preftune.fastpath``.

Each method runs in a fresh subprocess (so ``ru_maxrss`` is its own peak): one policy step
(forward + backward) and one reference forward (no grad) on a few real HH pairs through a
random-weight Llama. Prints median seconds and the peak RSS growth over the process's state
after loading model and data (ratio to plain).

    .venv/bin/python benchmarks/bench_fastpath.py [--pairs 4] [--max-length 512] [--repeats 5]
        [--threads 1]  # one thread gives steadier numbers on a busy shared machine
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
HH = ASSETS / "data" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
TOKENIZER = ASSETS / "tokenizers" / "gpt2"

METHODS = {
    "plain": None,
    "chunked": dict(chunked=True, share_prompt=False, pack=False),
    "share_prompt": dict(chunked=False, share_prompt=True, pack=False, segments=False),
    "pack": dict(chunked=False, share_prompt=False, pack=True, segments=False),
    "share_prompt+pack": dict(chunked=False, share_prompt=True, pack=True, segments=False),
    "+segments": dict(chunked=False, share_prompt=True, pack=True, segments=True),
    "all": dict(chunked=True, share_prompt=True, pack=True, segments=True),
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def setup(args: argparse.Namespace):
    """Model, tokenized examples, collated batch and pad id, all deterministic."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from preftune.data import collate_pairs, read_pairs, tokenize_pair

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    pairs = itertools.islice(read_pairs(HH, quiet=True), args.skip, args.skip + args.pairs)
    examples = [tokenize_pair(p, tok, max_length=args.max_length,
                              max_prompt_length=args.max_length // 2) for p in pairs]
    pad = tok.eos_token_id
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=1024, attn_implementation=args.attn)
    return LlamaForCausalLM(config), examples, collate_pairs(examples, pad), pad


def run_once(method: str, model, examples, batch, pad) -> tuple[float, float, list[float]]:
    """Seconds of one policy step (forward + backward) and one reference forward (no grad)."""
    import torch

    from preftune.fastpath import pair_logps
    from preftune.logprobs import concatenated_logps

    flags = METHODS[method]

    def logps():
        if flags is None:
            return concatenated_logps(model, batch)
        return pair_logps(model, examples, pad_token_id=pad, **flags)

    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    out = logps()
    (out.chosen.sum() - out.rejected.sum()).backward()
    step = time.perf_counter() - t
    del out
    t = time.perf_counter()
    with torch.no_grad():
        ref = logps()
    return step, time.perf_counter() - t, ref.chosen.tolist()


def peak_worker(args: argparse.Namespace) -> dict:
    """In a fresh process: peak RSS growth of one step + one reference forward."""
    model, examples, batch, pad = setup(args)
    gc.collect()
    base = _rss_mib()
    run_once(args.method, model, examples, batch, pad)
    return {"method": args.method, "peak_mib": _rss_mib() - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--skip", type=int, default=0, help="HH pairs to skip first")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--method", help=argparse.SUPPRESS)  # peak-memory worker mode
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.method:
        print(json.dumps(peak_worker(args)))
        return

    import torch

    methods = args.methods.split(",")
    peaks = {}
    for method in methods:
        cmd = [sys.executable, __file__, "--method", method, "--pairs", str(args.pairs),
               "--skip", str(args.skip), "--max-length", str(args.max_length),
               "--attn", args.attn, "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
        peaks[method] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]

    # Timings round-robin in one process, so load changes on a shared machine hit all alike.
    model, examples, batch, pad = setup(args)
    steps: dict[str, list[float]] = {m: [] for m in methods}
    refs: dict[str, list[float]] = {m: [] for m in methods}
    values = {}
    for i in range(args.repeats + 1):  # round 0 is a warm-up
        for method in methods:
            step, ref, values[method] = run_once(method, model, examples, batch, pad)
            if i:
                steps[method].append(step)
                refs[method].append(ref)

    lengths = [(len(e["prompt_input_ids"]), len(e["chosen_input_ids"]),
                len(e["rejected_input_ids"])) for e in examples]
    print(f"Llama h256 x 4 layers, vocab {model.config.vocab_size}, attn {args.attn}, "
          f"{torch.get_num_threads()} threads; {args.pairs} HH pairs, max_length "
          f"{args.max_length}, (prompt, chosen, rejected) lengths {lengths}; "
          f"median of {args.repeats}")
    print(f"{'method':<17} {'step fwd+bwd s':>15} {'ref fwd s':>10} {'peak MiB':>9} "
          f"{'peak/plain':>10} {'max |dlogp|':>12}")
    first = methods[0]
    for m in methods:
        diff = max(abs(a - b) for a, b in zip(values[m], values[first], strict=True))
        print(f"{m:<17} {statistics.median(steps[m]):>15.3f} {statistics.median(refs[m]):>10.3f} "
              f"{peaks[m]:>9.0f} {peaks[m] / peaks[first]:>10.2f} {diff:>12.2e}")


if __name__ == "__main__":
    main()
