"""Freed heap pages go back to the OS, and training values do not depend on it."""

import json

import pytest
import torch

from preftune.config import DPOConfig
from preftune.memory import memory_releaser, release_free_memory
from preftune.train import train

from .conftest import HH_HELPFUL


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_free_pages_inside_the_heap_are_released():
    if not release_free_memory():
        pytest.skip("no glibc malloc_trim here")
    # 100 KiB blocks come from the heap (below glibc's mmap threshold); the last one stays
    # allocated, so the freed ones sit under it and plain free() cannot shrink the heap.
    blocks = [torch.ones(25_600) for _ in range(800)]
    keep = blocks.pop()
    del blocks
    before = _rss_mib()
    assert release_free_memory()
    assert before - _rss_mib() > 40  # of the ~78 MiB freed
    assert keep.sum().item() == 25_600


def test_releaser_acts_only_on_cpu_when_enabled():
    assert memory_releaser(True, torch.device("cpu")) is release_free_memory
    assert memory_releaser(True, "cpu") is release_free_memory
    assert memory_releaser(True, torch.device("cuda", 0)) is not release_free_memory
    assert memory_releaser(False, torch.device("cpu")) is not release_free_memory


def test_training_values_do_not_depend_on_releasing_memory(tmp_path, tiny_model_dir):
    base = {"model": str(tiny_model_dir), "dataset": str(HH_HELPFUL), "max_length": 48,
            "max_prompt_length": 24, "eval_examples": 4, "n_samples": 0, "eval_every": 0,
            "batch_size": 4, "micro_batch_size": 2, "max_examples": 12, "max_steps": 2,
            "lr": 1e-3}
    runs = []
    for release in (True, False):
        run = train(DPOConfig(**base, release_memory=release,
                              output_dir=str(tmp_path / str(release))), progress=False)
        lines = (run / "metrics.jsonl").read_text().splitlines()
        runs.append([{k: v for k, v in json.loads(line).items() if k != "examples_per_second"}
                     for line in lines])
    assert runs[0] == runs[1]
