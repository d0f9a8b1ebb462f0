"""Run folders: only new, empty or preftune-made folders are written, one writer at a time,
nothing preftune did not write is deleted, and a moved run folder resumes where it is."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from preftune import report
from preftune.cli import main
from preftune.config import ConfigError, DPOConfig, parse_config
from preftune.rundir import MARKER, claim_output_dir
from preftune.train import find_resume_point

from .conftest import HH_HELPFUL
from .test_report import make_sft_run

TINY = {"max_length": 48, "max_prompt_length": 24, "eval_examples": 2, "n_samples": 0,
        "warmup_steps": 0, "eval_every": 0, "save_every": 1, "batch_size": 2,
        "micro_batch_size": 2, "max_examples": 6, "max_steps": 2}


def _args(model, out, dataset=HH_HELPFUL, **kw):
    settings = {**TINY, "model": model, "dataset": dataset, "output_dir": out, **kw}
    return [f"{k}={v}" for k, v in settings.items()]


def _pairs(path: Path) -> Path:
    rows = [{"prompt": f"Question {i}: name a colour.\nAnswer:", "chosen": f" Blue {i}.",
             "rejected": " I refuse."} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tree(root: Path) -> dict[str, tuple]:
    """Every path under root with its kind, content and modification time."""
    out = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        content = path.read_bytes() if path.is_file() else None
        out[str(path.relative_to(root))] = (path.is_dir(), content, stat.st_mtime_ns)
    return out


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _user_folder(root: Path) -> Path:
    """A folder of the user's own files, with names a run would write."""
    (root / "checkpoints" / "step-1").mkdir(parents=True)
    (root / "checkpoints" / "step-1" / "model.safetensors").write_bytes(b"my own weights")
    (root / "config.yaml").write_text("my: settings\n")
    (root / "data_report.json").write_text('{"mine": true}\n')
    (root / "samples.jsonl").write_text('{"note": "my samples"}\n')
    (root / "report").mkdir()
    (root / "report" / "index.html").write_text("<p>my page</p>")
    return root


@pytest.mark.parametrize("resume", ["false", "true"])
def test_user_folder_is_refused_and_left_untouched(tmp_path, tiny_model_dir, capsys, resume):
    folder = _user_folder(tmp_path / "mine")
    before = _tree(folder)
    assert main(["dpo", *_args(tiny_model_dir, folder, resume=resume)]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"preftune: error: output_dir: {folder} is not empty and was not made by preftune (it "
        "holds 'checkpoints', 'config.yaml', 'data_report.json', 'report', 'samples.jsonl'); "
        "choose a new or empty folder")
    assert _tree(folder) == before


def test_lone_user_report_folder_is_refused(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "mine"
    (folder / "report").mkdir(parents=True)
    (folder / "report" / "notes.txt").write_text("keep me")
    before = _tree(folder)
    assert main(["dpo", *_args(tiny_model_dir, folder)]) == 2
    assert "(it holds 'report')" in _one_error_line(capsys.readouterr().err)
    assert _tree(folder) == before


def test_empty_and_missing_folders_are_claimed_and_marked(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (empty, tmp_path / "new" / "nested"):
        with claim_output_dir(folder, resuming=False):
            record = json.loads((folder / MARKER).read_text())
            assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
            (folder / "metrics.jsonl").write_text("")
        # Preftune's own folder: resumable, and a new run there is told it holds a run.
        claim_output_dir(folder, resuming=True).release()
        with pytest.raises(ConfigError, match=f"output_dir: {folder} already holds a run"):
            claim_output_dir(folder, resuming=False)


def test_a_failed_claim_leaves_the_folder_as_it_was(tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(RuntimeError), claim_output_dir(folder, resuming=False):
        raise RuntimeError("the model could not be loaded")
    assert not folder.exists() and tmp_path.is_dir()  # the claim made it, and removed it
    folder.mkdir()
    with pytest.raises(RuntimeError), claim_output_dir(folder, resuming=False):
        raise RuntimeError("the model could not be loaded")
    assert folder.is_dir() and not any(folder.iterdir())  # the user's empty folder stays


def test_older_run_folder_without_marker_resumes_and_is_marked(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text("# preftune DPOConfig, fully resolved\nbeta: 0.1\n")
    (old / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="already holds a run"):
        claim_output_dir(old, resuming=False)
    claim_output_dir(old, resuming=True).release()
    assert (old / MARKER).is_file()

    # The same names without preftune's config.yaml header are the user's: refused.
    (old / MARKER).unlink()
    (old / "config.yaml").write_text("beta: 0.1\n")
    with pytest.raises(ConfigError, match="was not made by preftune"):
        claim_output_dir(old, resuming=True)
    assert not (old / MARKER).exists()


HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from preftune.rundir import claim_output_dir
    lock = claim_output_dir(Path(sys.argv[1]), resuming=True)
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until stdin closes (or the process is killed)
""")


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line == "locked\n", proc.stderr.read()
    return proc


def test_second_process_is_refused_with_the_holders_pid_and_host(tmp_path, tiny_model_dir,
                                                                   capsys):
    folder = tmp_path / "run"
    proc = _holder(folder)
    try:
        message = (f"output_dir: {folder} is in use by another preftune run (pid {proc.pid} on "
                   f"host {socket.gethostname()!r}); wait for it to end or stop it")
        with pytest.raises(ConfigError) as refused:
            claim_output_dir(folder, resuming=True)
        assert str(refused.value) == message
        assert main(["dpo", *_args(tiny_model_dir, folder, resume="true")]) == 2
        assert _one_error_line(capsys.readouterr().err) == f"preftune: error: {message}"
        assert sorted(os.listdir(folder)) == [MARKER]
    finally:
        proc.communicate(input="")  # closing stdin ends the holder
    assert proc.returncode == 0
    claim_output_dir(folder, resuming=True).release()  # free again once the holder is gone


def test_sigkilled_holder_leaves_no_stale_lock(tmp_path):
    folder = tmp_path / "run"
    proc = _holder(folder)
    proc.kill()
    proc.communicate()
    with claim_output_dir(folder, resuming=True):
        assert json.loads((folder / MARKER).read_text())["pid"] == os.getpid()


def test_report_never_replaces_what_preftune_did_not_write(tmp_path, capsys):
    run = make_sft_run(tmp_path / "run")
    (run / "report").write_text("my own notes, in a file named report")
    assert report.main([str(run)]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"preftune: error: {run / 'report'}: a file preftune did not write is in the way; "
        "move it elsewhere to write the report")
    assert (run / "report").read_text() == "my own notes, in a file named report"

    (run / "report").unlink()
    (run / "report").mkdir()
    (run / "report" / "notes.txt").write_text("mine")
    assert report.main([str(run)]) == 2
    assert "a folder preftune did not write" in capsys.readouterr().err
    assert os.listdir(run / "report") == ["notes.txt"]
    assert not any(p.name.startswith(".report") for p in run.iterdir())  # no staging left

    # A report preftune wrote, with a user's file added inside, is not deleted either.
    shutil.rmtree(run / "report")
    assert report.main([str(run)]) == 0
    (run / "report" / "notes.txt").write_text("mine")
    assert report.main([str(run)]) == 2
    assert (run / "report" / "notes.txt").read_text() == "mine"


def test_resume_reads_booleans(tiny_model_dir, tmp_path):
    read = {}
    for typed in ("false", "no", "off", "none", "FALSE", "null", "true", "latest", "./no"):
        args = [f"model={tiny_model_dir}", f"dataset={HH_HELPFUL}", f"resume={typed}"]
        read[typed] = parse_config(DPOConfig, args).resume
    assert read == {"false": None, "no": None, "off": None, "none": None, "FALSE": None,
                    "null": None, "true": "true", "latest": "true", "./no": "./no"}
    assert DPOConfig(model="m", dataset="d", resume=False).resume is None  # YAML `resume: no`
    # Today's bug: `false` was taken as the name of a checkpoint folder.
    cfg = parse_config(DPOConfig, [f"model={tiny_model_dir}", f"dataset={HH_HELPFUL}",
                                   "resume=false"])
    assert find_resume_point(cfg, tmp_path) is None


def test_moved_run_folder_resumes_where_it_now_is(tmp_path, tiny_model_dir):
    data = _pairs(tmp_path / "pairs.jsonl")
    first = tmp_path / "first"
    assert main(["dpo", *_args(tiny_model_dir, first, data)]) == 0
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    assert main(["dpo", *_args(tiny_model_dir, moved, data, max_steps=3, resume="true")]) == 0
    rows = [json.loads(line) for line in (moved / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert f"output_dir: {moved}" in (moved / "config.yaml").read_text()
    assert not first.exists()
