"""Gradient accumulation under FSDP2 (2 processes, gloo): one reduction per optimizer step,
the same steps as reducing every micro-batch and as one process; dtype=bfloat16 gathers bf16
weights and reduces in reduce_dtype (tests/_fsdp_worker.py does the training)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp-accumulation")
    out = tmp / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp / "cache")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "tests._fsdp_worker", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_accumulation_reduces_once_per_step_with_the_same_result(result):
    once, every, single = result["once"], result["every"], result["single"]
    # One reduce-scatter per FSDP module per step, not one per micro-batch (2 per process).
    modules = once["modules"]
    assert modules >= 2
    assert [len(r) for r in once["reductions"]] == [modules, modules]
    assert [len(r) for r in every["reductions"]] == [2 * modules, 2 * modules]
    # ... with the same losses and weights as reducing every micro-batch, and as one process.
    for other in (every, single):
        assert once["losses"] == pytest.approx(other["losses"], abs=1e-6)
    assert result["difference"]["every"] <= 1e-6
    assert result["difference"]["single"] <= 1e-6


def test_bf16_gathers_bf16_weights_and_reduces_in_reduce_dtype(result):
    bf16, reduced, pure = result["bf16"], result["bf16_reduce"], result["pure"]
    # float32 reductions by default, of bf16 gradients too (pure bf16: master_weights)
    for run in (bf16, pure):
        assert {d for step in run["reductions"] for d in step} == {"torch.float32"}
    assert {d for step in reduced["reductions"] for d in step} == {"torch.bfloat16"}
    # The precomputed reference (an unsharded copy) and a live one (sharded like the policy)
    # compute as the sharded policy does.
    for run in (bf16, reduced, result["bf16_live"], pure):
        assert run["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    # bf16 compute: the second step moves off the float32 one, by bf16 rounding only.
    assert bf16["losses"][1] == pytest.approx(result["once"]["losses"][1], abs=1e-4)
    assert 0 < result["difference"]["bf16"] < 1e-2
