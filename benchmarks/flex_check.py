"""FlexAttention vs the segment path on the pair layout: forward and backward (GPU).

    python benchmarks/flex_check.py                 # CUDA: forward + backward, fp32
    python benchmarks/flex_check.py --device cpu    # forward only (no flex backward on CPU)

A tiny random Llama (grouped heads, head_dim 16) runs micro-batches of pairs with shared
prompts and uneven lengths, with activation checkpointing, once per attention kernel: packed
into one row (as training runs them), then into rows of at most 24 tokens (padding; a second
shape, so the compiled kernel's recompilation for new lengths runs too). Prints the largest
differences as JSON; exits non-zero above the tolerance. ``flex_backward_check`` is the
function to call from elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from preftune import attention
from preftune.fastpath import FastPaths, batch_logps, decide_fast_paths
from preftune.models import enable_activation_checkpointing

VOCAB = 512


def _examples(n: int = 6, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(1, VOCAB, (k,), generator=g).tolist()

    out = []
    for i in range(n):
        prompt = ids(5 + 7 * i % 13)
        chosen, rejected = prompt + ids(3 + 5 * i % 11), prompt + ids(2 + 3 * i % 17)
        out.append({"chosen_input_ids": chosen, "rejected_input_ids": rejected,
                    "chosen_labels": [-100] * len(prompt) + chosen[len(prompt):],
                    "rejected_labels": [-100] * len(prompt) + rejected[len(prompt):]})
    return out


def flex_backward_check(device: str | torch.device = "cuda", *, backward: bool = True,
                        dtype: torch.dtype = torch.float32,
                        budgets: tuple[int | None, ...] = (None, 24)) -> dict[str, float]:
    """Max abs differences between the flex and the segment kernels on ``device``, over one
    micro-batch per row budget of ``budgets`` (None: one row): of the pair log-probs
    (``logps``), of a DPO-style loss (``loss``) and, with ``backward``, of every parameter's
    gradient (``grad``; ``grad_scale``: the largest gradient entry); ``flex_calls``:
    FlexAttention calls in the flex runs (one per layer per forward, and per recompute)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).train()
    enable_activation_checkpointing(model)  # the recompute must reuse the block mask too
    examples = _examples()
    base = decide_fast_paths(FastPaths(pad_token_id=0, chunk_size=32), [model], max_length=64)
    flex_calls = 0
    flex = attention._flex

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        nonlocal flex_calls
        flex_calls += 1
        return flex(*args, **kwargs)

    def run(fast: FastPaths) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        batch = {"layout": fast.collate(examples)["layout"].to(device)}
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):
            logps = batch_logps(model, batch, fast)
            loss = -F.logsigmoid(0.1 * (logps.chosen - logps.rejected)).mean()
            if backward:
                loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        return torch.cat([logps.chosen, logps.rejected]).float(), loss.float(), grads

    out = dict.fromkeys(("logps", "loss", "grad", "grad_scale") if backward else
                        ("logps", "loss"), 0.0)
    for budget in budgets:
        fast = dataclasses.replace(base, token_budget=budget, attention_kernel="segment")
        lp_s, loss_s, g_s = run(fast)
        attention._flex = counted
        try:
            lp_f, loss_f, g_f = run(dataclasses.replace(fast, attention_kernel="flex"))
        finally:
            attention._flex = flex
        out["logps"] = max(out["logps"], (lp_f - lp_s).abs().max().item())
        out["loss"] = max(out["loss"], (loss_f - loss_s).abs().item())
        if backward:
            if g_s.keys() != g_f.keys() or not g_s:
                raise RuntimeError("the kernels' runs gave gradients of different weights")
            out["grad"] = max(out["grad"], *((g_f[n] - g).abs().max().item()
                                             for n, g in g_s.items()))
            out["grad_scale"] = max(out["grad_scale"], *(g.abs().max().item()
                                                         for g in g_s.values()))
    return {**out, "flex_calls": float(flex_calls)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    # CPU: forward only (no FlexAttention backward there), one shape (one compilation)
    result = flex_backward_check(args.device, backward=cuda,
                                 budgets=(None, 24) if cuda else (None,))
    print(json.dumps(result))
    worst = max(v for k, v in result.items() if k not in ("flex_calls", "grad_scale"))
    return 0 if worst <= args.tolerance and result["flex_calls"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
