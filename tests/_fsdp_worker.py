"""Run by test_fsdp_accumulation.py under torchrun (2 processes, gloo): ``train_step`` on an
FSDP2-sharded tiny Llama in several settings, and on rank 0 alone unsharded; rank 0 writes
the losses, the reductions each step made and the weight differences to a JSON file.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests._fsdp_worker OUT
"""

from __future__ import annotations

import json
import sys

import torch

from preftune.config import DPOConfig
from preftune.distributed import World, close_world, full_state_dict, init_world, shard
from preftune.precision import fsdp_dtypes, weights_dtype
from preftune.reference import FrozenReference
from preftune.train import Data, build_objective, make_state, precompute_reference, train_step

from .conftest import tiny_llama
from .test_step import VOCAB, _examples

STEPS, BATCH = 2, 4


def reductions(model: torch.nn.Module) -> tuple[list[str], int]:
    """A list that gets the dtype of every gradient reduce-scatter of ``model``'s FSDP2
    modules (their all-reduce hook runs once on each reduce-scatter output), and how many
    such modules there are."""
    from torch.distributed.fsdp import FSDPModule

    seen: list[str] = []
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in modules:
        module.set_all_reduce_hook(lambda out: seen.append(str(out.dtype)))
    return seen, len(modules)


def run(world: World, live: bool = False, **settings) -> dict:
    """Two steps of 4 pairs in micro-batches of 1 (2 per process per step), from the same
    start, against the precomputed reference (``live``: a sharded copy of the start); returns
    the losses, each step's reductions and the final weights (rank 0)."""
    cfg = DPOConfig(model="tiny", dataset="pairs.jsonl", lr=1e-3, optimizer="adamw",
                    warmup_steps=0, batch_size=BATCH, micro_batch_size=1, chunked_logps=False,
                    share_prompt=False, pack=False, **settings)
    policy = tiny_llama(VOCAB).to(weights_dtype(cfg)).train()
    objective = build_objective(cfg, 0)
    data = Data(train=_examples(n=STEPS * BATCH), eval=[], sample_prompts=[], dropped=0)
    if live:
        frozen = shard(tiny_llama(VOCAB).to(weights_dtype(cfg)).requires_grad_(False), world,
                       train=False, **fsdp_dtypes(cfg))
        reference = FrozenReference(frozen, objective.sequence_logps)
    else:
        reference = precompute_reference(cfg, policy, data, 0, world, objective, None)
    policy = shard(policy, world, train=True, **fsdp_dtypes(cfg))
    seen, modules = reductions(policy)
    state = make_state(cfg, world, policy, reference, objective, 0, total_steps=STEPS)
    losses, steps = [], []
    for step in range(STEPS):
        before = len(seen)
        losses.append(train_step(state, data.train[step * BATCH:(step + 1) * BATCH])["loss"])
        steps.append(seen[before:])
    return {"losses": losses, "reductions": steps, "modules": modules,
            "weights": full_state_dict(policy, world)}


def largest_difference(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main(out: str) -> None:
    world = init_world("cpu")
    runs = {"once": run(world), "every": run(world, reduce_every_micro_batch=True),
            "bf16": run(world, dtype="bfloat16"),
            "bf16_live": run(world, live=True, dtype="bfloat16"),
            "bf16_reduce": run(world, dtype="bfloat16", reduce_dtype="bfloat16"),
            "pure": run(world, dtype="bfloat16", master_weights="bfloat16")}
    if world.main:
        runs["single"] = run(World())
        result = {name: {k: v for k, v in r.items() if k != "weights"}
                  for name, r in runs.items()}
        weights = {name: r["weights"] for name, r in runs.items()}
        result["difference"] = {
            "every": largest_difference(weights["once"], weights["every"]),
            "single": largest_difference(weights["once"], weights["single"]),
            "bf16": largest_difference(weights["once"], weights["bf16"])}
        with open(out, "w") as f:
            json.dump(result, f)
    close_world(world)


if __name__ == "__main__":
    main(sys.argv[1])
