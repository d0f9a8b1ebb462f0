"""Checkpoints run no code, damage is found before loading, a full disk is one line."""

import dataclasses
import errno
import json
import os
import pickle
import shlex
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import SafetensorError

from preftune import checkpoint, models
from preftune.checkpoint import CheckpointError, disk_needed
from preftune.config import ConfigError, DPOConfig
from preftune.distributed import World
from preftune.train import find_resume_point, preflight

from .conftest import tiny_llama


class _Planted:
    """A pickle that, when loaded by plain pickle, runs a shell command creating ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _plant(folder: Path, marker: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))


def _trained(seed=0, **overrides):
    model = tiny_llama(vocab_size=64, seed=seed, **overrides)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    return model, optimizer


def _save(run, step, model, optimizer, keep=3, world=None):
    return checkpoint.save_checkpoint(run, step, model, optimizer, {"counters": {"step": step}},
                                      keep=keep, world=world)


def _same(a, b):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "older-checkpoint"])
def test_planted_dcp_beside_safetensors_is_never_read(tmp_path, manifest):
    model, optimizer = _trained()
    path = _save(tmp_path, 4, model, optimizer)
    if not manifest:  # as written before manifests existed
        (path / checkpoint.MANIFEST).unlink()
    marker = tmp_path / "pwned"
    _plant(path / "dcp", marker)
    fresh, fresh_opt = _trained(seed=1)
    assert checkpoint.load_checkpoint(path, fresh, fresh_opt)["counters"] == {"step": 4}
    assert not marker.exists()
    _same(model, fresh)


@pytest.mark.parametrize("manifest", [True, False], ids=["forged-manifest", "no-manifest"])
def test_malicious_dcp_metadata_is_refused_without_running(tmp_path, manifest):
    model, optimizer = _trained()
    path = _save(tmp_path, 4, model, optimizer)
    (path / checkpoint.WEIGHTS_FILE).unlink()  # now it looks like a sharded checkpoint
    marker = tmp_path / "pwned"
    _plant(path / "dcp", marker)
    if manifest:  # whoever can write the files can also rewrite the manifest to match
        (path / checkpoint.MANIFEST).unlink()
        checkpoint._write_manifest(path, checkpoint.SHARDED)
    else:
        (path / checkpoint.MANIFEST).unlink()
    fresh, fresh_opt = _trained(seed=1)
    with pytest.raises(CheckpointError) as refused:
        checkpoint.load_checkpoint(path, fresh, fresh_opt)
    assert str(refused.value) == (f"resume: {path}/dcp/.metadata is not DCP metadata (refusing "
                                  "to load posix.system); refusing to load it")
    assert not marker.exists()


def test_real_sharded_checkpoint_loads_through_the_restricted_reader(tmp_path):
    model, optimizer = _trained()
    optimizer.param_groups[0]["lr"] = 3e-4  # a non-tensor value: read with weights_only=True
    # One gloo process, as torchrun --nproc_per_node=1 gives: the sharded (DCP) save path.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        path = _save(tmp_path, 2, model, optimizer, world=World(distributed=True))
    finally:
        dist.destroy_process_group()
    manifest = json.loads((path / checkpoint.MANIFEST).read_text())
    assert manifest["kind"] == "sharded" and "dcp/.metadata" in manifest["files"]
    assert not (path / checkpoint.WEIGHTS_FILE).exists()
    fresh, fresh_opt = _trained(seed=1)  # resumed in a plain single process
    assert checkpoint.load_checkpoint(path, fresh, fresh_opt)["counters"] == {"step": 2}
    _same(model, fresh)
    assert fresh_opt.param_groups[0]["lr"] == 3e-4
    for a, b in zip(optimizer.state.values(), fresh_opt.state.values(), strict=True):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


DAMAGE = {
    "truncated-weights": ("model.safetensors", _truncate),
    "flipped-weights": ("model.safetensors", _flip_byte),
    "empty-state": ("state.pt", lambda f: f.write_bytes(b"")),
    "garbage-state": ("state.pt", lambda f: f.write_bytes(os.urandom(f.stat().st_size))),
    "garbage-manifest": ("manifest.json", lambda f: f.write_text("{not json")),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, damage):
    name, spoil = DAMAGE[damage]
    model, optimizer = _trained()
    path = _save(tmp_path, 1, model, optimizer)
    spoil(path / name)
    with pytest.raises(CheckpointError, match=rf"^resume: {path / name} ") as found:
        checkpoint.load_checkpoint(path, *_trained(seed=1))
    assert "\n" not in str(found.value)


@pytest.mark.parametrize("damage", ["truncated-weights", "empty-state", "garbage-state"])
def test_damaged_checkpoint_without_manifest_is_one_line(tmp_path, damage):
    name, spoil = DAMAGE[damage]
    model, optimizer = _trained()
    path = _save(tmp_path, 1, model, optimizer)
    (path / checkpoint.MANIFEST).unlink()
    spoil(path / name)
    with pytest.raises(CheckpointError, match=rf"^resume: {path / name} is damaged"):
        checkpoint.load_checkpoint(path, *_trained(seed=1))


def test_checkpoint_of_another_model_shape_is_one_line(tmp_path):
    model, optimizer = _trained()
    path = _save(tmp_path, 1, model, optimizer)
    other, other_opt = _trained(hidden_size=16, intermediate_size=32)
    with pytest.raises(CheckpointError) as found:
        checkpoint.load_checkpoint(path, other, other_opt)
    assert str(found.value) == (
        f"resume: {path}/model.safetensors does not match the model (size mismatch for "
        "model.embed_tokens.weight: copying a param with shape torch.Size([64, 32]) from "
        "checkpoint, the shape in current model is torch.Size([64, 16]).)")


def test_resume_point_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, capsys):
    model, optimizer = _trained()
    for step in (1, 2, 3):
        _save(tmp_path, step, model, optimizer)
    root = tmp_path / "checkpoints"
    assert checkpoint.resume_point(tmp_path) == root / "step-3"
    _flip_byte(root / "step-3" / "state.pt")
    (root / "step-2" / "model.safetensors").write_bytes(b"")
    assert checkpoint.resume_point(tmp_path) == root / "step-1"
    assert capsys.readouterr().err == (
        f"preftune: warning: resume: {root}/step-3/state.pt is damaged (its SHA-256 differs "
        f"from manifest.json); resuming from {root}/step-1 instead\n")
    _truncate(root / "step-1" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"step-3/state.pt is damaged .*; no older "
                                              r"checkpoint verifies either$"):
        checkpoint.resume_point(tmp_path)


def test_resume_true_skips_a_damaged_checkpoint_and_resume_path_refuses_it(tmp_path, capsys):
    model, optimizer = _trained()
    for step in (1, 2):
        _save(tmp_path, step, model, optimizer)
    step2 = tmp_path / "checkpoints" / "step-2"
    _flip_byte(step2 / "model.safetensors")
    cfg = DPOConfig(model="m", dataset="x.jsonl", output_dir=str(tmp_path))
    # Both answer before any model is loaded.
    found = find_resume_point(dataclasses.replace(cfg, resume="true"), tmp_path)
    assert found == tmp_path / "checkpoints" / "step-1"
    assert capsys.readouterr().err.startswith(f"preftune: warning: resume: {step2}/model.")
    with pytest.raises(CheckpointError) as refused:
        find_resume_point(dataclasses.replace(cfg, resume=str(step2)), tmp_path)
    assert str(refused.value) == (f"resume: {step2}/model.safetensors is damaged (its SHA-256 "
                                  "differs from manifest.json)")


NO_SPACE = {
    "oserror": OSError(errno.ENOSPC, "No space left on device"),
    "quota": OSError(errno.EDQUOT, "Disk quota exceeded"),
    # What safetensors raises on a full disk (measured on a full tmpfs).
    "safetensors": SafetensorError("Error while serializing: I/O error: No space left on device "
                                   "(os error 28)"),
}


@pytest.mark.parametrize("error", NO_SPACE)
def test_full_disk_during_save_is_one_line_and_leaves_no_partial_folder(tmp_path, monkeypatch,
                                                                         error):
    model, optimizer = _trained()
    first = _save(tmp_path, 1, model, optimizer)

    def full(*args, **kwargs):
        raise NO_SPACE[error]

    monkeypatch.setattr(checkpoint, "save_file", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(
        10**9, 10**9 - 4 * 10**6, 4 * 10**6))
    with pytest.raises(CheckpointError) as found:
        _save(tmp_path, 2, model, optimizer)
    root = tmp_path / "checkpoints"
    assert str(found.value) == (f"{root}: no space left on the device for checkpoint step-2 "
                                "(0.00 GB free); removed the partial checkpoint")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-1"]
    assert checkpoint.resume_point(tmp_path) == first


def test_full_disk_while_writing_state_is_one_line(tmp_path, monkeypatch):
    model, optimizer = _trained()
    def full(obj, f):  # as torch.save fails on a full disk: a RuntimeError after the OSError
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError(  # noqa: B904
                "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match="no space left on the device for checkpoint"):
        _save(tmp_path, 1, model, optimizer)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == []


def test_full_disk_during_export_is_one_line(tmp_path, monkeypatch, gpt2_tokenizer):
    model = tiny_llama(vocab_size=64)

    def full(folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", full)
    with pytest.raises(models.ModelError, match=rf"^{tmp_path}/final: no space left on the "
                                                r"device for the model \(.* GB free\)"):
        models.save_pretrained(model, gpt2_tokenizer, tmp_path / "final")
    assert list(tmp_path.iterdir()) == []


def _usage(free):
    return namedtuple("usage", "total used free")(10**12, 10**12 - free, free)


def test_resume_removes_interrupted_writes_before_checking_space(tmp_path, tiny_model_dir,
                                                                 monkeypatch):
    run = tmp_path / "run"
    stale = [run / "checkpoints" / ".step-3.tmp", run / ".final.0123abcd.partial"]
    mine = [run / ".final.notmine.partial", run / ".other.0123abcd.partial", run / "notes"]
    for folder in stale + mine:
        (folder / "sub").mkdir(parents=True)
    # The stale folders fill the disk: only once they are gone is there room.
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: _usage(0 if stale[0].exists() else 10**12))
    cfg = DPOConfig(model=str(tiny_model_dir), dataset="x.jsonl", output_dir=str(run))
    with pytest.raises(ConfigError, match="GB free"):
        preflight(cfg, run)  # a new run touches nothing
    preflight(dataclasses.replace(cfg, resume="true"), run)
    assert [p.exists() for p in stale + mine] == [False, False, True, True, True]


def test_disk_estimate_counts_the_runs_dtype_not_the_files(tmp_path):
    """A bf16 model folder trained with float32 master weights (the default, also under
    dtype=bfloat16) saves checkpoints and an export twice the size of its files."""
    folder = tmp_path / "bf16"
    tiny_llama(vocab_size=256).to(torch.bfloat16).save_pretrained(folder)
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    run = tmp_path / "run"
    # AdamW, 2 kept: 3 checkpoints of 3x the weights coexist at the peak
    assert disk_needed(folder, run, keep=2, optimizer_states=2) == 9 * 2 * weights
    assert disk_needed(folder, run, keep=2, optimizer_states=2, element_size=2) == 9 * weights


def test_preflight_budgets_every_checkpoint_that_coexists(tmp_path, tiny_model_dir,
                                                          monkeypatch):
    weights = sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    cfg = DPOConfig(model=str(tiny_model_dir), dataset="x.jsonl", output_dir=str(tmp_path),
                    optimizer="adamw", keep_checkpoints=2)
    # AdamW: a checkpoint is 3x the weights, and 3 of them coexist while the third is saved.
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _usage(9 * weights - 1))
    with pytest.raises(ConfigError) as found:
        preflight(cfg, tmp_path)
    assert str(found.value) == (
        f"output_dir: {tmp_path} has {(9 * weights - 1) / 1e9:.2f} GB free; 2 kept checkpoints, "
        f"the one being saved and the export of this model need about {9 * weights / 1e9:.2f} "
        "GB more")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _usage(9 * weights))
    preflight(cfg, tmp_path)
    # LoRA, rank 1 on hidden size 32: checkpoints budgeted at 8/32 of the full ones.
    monkeypatch.setattr(shutil, "disk_usage", lambda p: _usage(3 * weights))
    with pytest.raises(ConfigError):
        preflight(cfg, tmp_path)
    preflight(dataclasses.replace(cfg, lora=True, lora_r=1), tmp_path)
