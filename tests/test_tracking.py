"""The `report_to` sinks with the real packages: what RunLog sends is read back from the files
TensorBoard and W&B (offline) write, and must carry the same names, steps and values."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from preftune.config import ConfigError
from preftune.tracking import RunLog, read_jsonl

CONFIG = {"stage": "dpo", "beta": 0.1, "loss": "dpo", "max_steps": 4, "resume": None}

EVAL_0 = {"split": "eval", "step": 0, "examples": 0, "loss": 0.6931, "rewards/chosen": 0.0,
          "rewards/accuracies": 0.0, "logps/chosen": -52.25}
EVAL_4 = {**EVAL_0, "step": 4, "examples": 16, "loss": 0.61, "rewards/accuracies": 0.75}


def train_record(step: int, loss: float) -> dict:
    return {"split": "train", "step": step, "examples": 4 * step, "loss": loss,
            "rewards/chosen": 0.01 * step, "rewards/accuracies": 0.5, "rewards/margins": 0.02,
            "logps/chosen": -50.5,
            "grad_norm": 1.25, "lr": 1e-6 * step, "tokens": 100 * step, "skipped_steps": 0,
            "examples_per_second": 2.5, "epoch": 0, "note": "not a number", "nan": None}


def samples(step: int) -> list[dict]:
    return [{"step": step, "prompt": "Human: hi | there\n\nAssistant:", "policy": " hello <b>",
             "reference": " hey"},
            {"step": step, "prompt": "Human: 2+2?", "policy": " 4", "reference": " four"}]


TRAIN_NAMES = {"train/" + k for k in ("examples", "loss", "rewards/chosen", "rewards/accuracies",
                                      "rewards/margins", "logps/chosen", "grad_norm", "lr",
                                      "tokens", "skipped_steps", "examples_per_second", "epoch")}
EVAL_NAMES = {"eval/" + k for k in ("examples", "loss", "rewards/chosen", "rewards/accuracies",
                                    "logps/chosen")}


def feed(log: RunLog) -> dict[str, list[tuple[int, float]]]:
    """A short run as train.py drives it (log_every=2); returns what the sinks should hold."""
    expected: dict[str, list[tuple[int, float]]] = {}

    def logged(record: dict) -> None:
        for key, value in record.items():
            if key not in ("split", "step") and isinstance(value, int | float):
                expected.setdefault(f"{record['split']}/{key}", []).append(
                    (record["step"], float(value)))

    log.eval(EVAL_0)
    logged(EVAL_0)
    for step, loss in zip(range(1, 5), (0.69, 0.67, 0.66, 0.62), strict=True):
        record = train_record(step, loss)
        log.train(record, write=step % 2 == 0)
        if step % 2 == 0:
            logged(record)
        if step == 2:
            for sample in samples(step):
                log.sample(sample)
    log.eval(EVAL_4)
    logged(EVAL_4)
    for sample in samples(4):
        log.sample(sample)
    log.close()
    return expected


# TensorBoard

def tensorboard_events(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
               for tag in acc.Tags()["scalars"]}
    texts = {tag.removesuffix("/text_summary"): [
        (e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]
        for tag in acc.Tags()["tensors"]}
    return scalars, texts


def assert_same_series(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for name, points in expected.items():
        assert [s for s, _ in got[name]] == [s for s, _ in points], name
        # TensorBoard stores float32
        assert [v for _, v in got[name]] == pytest.approx([v for _, v in points], rel=1e-6), name


def test_tensorboard_scalars_samples_and_config(tmp_path):
    pytest.importorskip("tensorboard")
    log = RunLog(tmp_path, 4, "dpo", 0, False, report_to=["tensorboard"], config=CONFIG)
    expected = feed(log)
    assert set(expected) == TRAIN_NAMES | EVAL_NAMES

    scalars, texts = tensorboard_events(tmp_path)
    assert_same_series(scalars, expected)
    assert scalars["train/loss"] == [(2, pytest.approx(0.67)), (4, pytest.approx(0.62))]
    assert scalars["eval/rewards/accuracies"] == [(0, 0.0), (4, 0.75)]

    assert set(texts) == {"config", "samples"}
    [(step, config)] = texts["config"]
    assert step == 0
    assert "| beta | 0.1 |" in config and "| resume | None |" in config
    assert [step for step, _ in texts["samples"]] == [2, 4]
    table = texts["samples"][0][1].splitlines()
    assert table[:2] == ["| prompt | policy | reference |", "| --- | --- | --- |"]
    assert table[2:] == ["| Human: hi &#124; there<br><br>Assistant: |  hello &lt;b&gt; |  hey |",
                         "| Human: 2+2? |  4 |  four |"]
    # metrics.jsonl and samples.jsonl are as before
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 2, 4, 4]
    assert len(read_jsonl(tmp_path / "samples.jsonl")) == 4


def test_tensorboard_resume_drops_the_crashed_runs_later_steps(tmp_path):
    pytest.importorskip("tensorboard")
    first = RunLog(tmp_path, 4, "dpo", 0, False, report_to=["tensorboard"])
    for step in range(1, 5):
        first.train(train_record(step, 1.0 + step), write=True)
    first.close()
    resumed = RunLog(tmp_path, 4, "dpo", 2, False, report_to=["tensorboard"])
    for step in (3, 4):
        resumed.train(train_record(step, 2.0 + step), write=True)
    resumed.close()
    scalars, _ = tensorboard_events(tmp_path)
    assert scalars["train/loss"] == [(1, 2.0), (2, 3.0), (3, 5.0), (4, 6.0)]


# W&B, offline

@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    home = tmp_path / "wandb-home"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR",
                "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    for var in ("WANDB_RUN_ID", "WANDB_PROJECT", "WANDB_RESUME", "WANDB_NAME"):
        monkeypatch.delenv(var, raising=False)
    yield wandb
    wandb.teardown()  # stop the wandb-core process this test started


def wandb_records(run_dir: Path):
    """The protobuf records of a run's .wandb transaction log (LevelDB log format: 32 KiB
    blocks of chunks, each with a 7-byte header of crc32, length and type)."""
    from wandb.proto import wandb_internal_pb2

    [path] = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(run_dir: Path):
    """(run record, [history rows as {name: value}]) of an offline run."""
    run, rows = None, []
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            row = {}
            for item in record.history.item:
                name, *sub = list(item.nested_key) or [item.key]
                value = json.loads(item.value_json)
                if sub:  # a logged object, e.g. samples -> {"path": ..., "nrows": ...}
                    row.setdefault(name, {})[sub[0]] = value
                else:
                    row[name] = value
            rows.append(row)
    return run, rows


def test_wandb_offline_logs_what_tensorboard_logs(tmp_path, wandb_offline):
    pytest.importorskip("tensorboard")
    out = tmp_path / "my-run"
    out.mkdir()
    log = RunLog(out, 4, "dpo", 0, False, report_to=["tensorboard", "wandb"], config=CONFIG)
    run_id = log.sinks[1].run.id
    expected = feed(log)
    # run.finish() returns before wandb-core has written the run's file; teardown waits for it.
    wandb_offline.teardown()

    run_dir = out / "wandb" / "latest-run"
    assert run_dir.resolve().name.endswith(run_id)
    run, rows = wandb_history(run_dir)
    assert run.run_id == run_id and run.display_name == "my-run" and run.project == "preftune"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert {k: config[k] for k in CONFIG} == CONFIG
    assert (out / "wandb" / "preftune-run-id").read_text().strip() == run_id

    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for name, value in row.items():
            if name.startswith(("train/", "eval/")):
                series.setdefault(name, []).append((row["step"], value))
    assert series == expected  # exact: W&B keeps float64
    scalars, _ = tensorboard_events(out)
    assert set(series) == set(scalars) == TRAIN_NAMES | EVAL_NAMES

    tables = [(row["step"], row["samples"]) for row in rows if "samples" in row]
    assert [step for step, _ in tables] == [2, 4]
    written = json.loads((run_dir / "files" / tables[0][1]["path"]).read_text())
    assert written["columns"] == ["prompt", "policy", "reference"]
    assert written["data"] == [[s["prompt"], s["policy"], s["reference"]] for s in samples(2)]


def test_wandb_resume_keeps_the_run_id(tmp_path, wandb_offline):
    def run_id(initial: int) -> str:
        log = RunLog(tmp_path, 4, "dpo", initial, False, report_to=["wandb"])
        try:
            return log.sinks[0].run.id
        finally:
            log.close()

    first = run_id(0)
    assert run_id(2) == first  # resumed: the same W&B run
    assert run_id(0) != first  # started over: a new one


def test_wandb_without_login_is_a_config_error(tmp_path, wandb_offline, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"^report_to: wandb could not start a run \(.*\); "
                                          r"log in with `wandb login` or set WANDB_MODE=offline$"):
        RunLog(tmp_path, 4, "dpo", 0, False, report_to=["wandb"])


# Without the packages

@pytest.mark.parametrize("sink", ["tensorboard", "wandb"])
def test_missing_package_is_a_one_line_config_error(tmp_path, monkeypatch, sink):
    monkeypatch.setitem(sys.modules, sink, None)  # makes `import <sink>` fail
    with pytest.raises(ConfigError) as error:
        RunLog(tmp_path, 4, "dpo", 0, False, report_to=[sink])
    assert str(error.value) == (f"report_to: {sink} needs the '{sink}' package "
                                f"(pip install 'preftune[{sink}]')")
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing opened before the check
    # Ranks other than 0 have no sinks, so they do not need the packages.
    RunLog(tmp_path, 4, "dpo", 0, False, enabled=False, report_to=[sink]).close()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- reading the logs back


def test_read_jsonl_keeps_lines_holding_unicode_line_breaks(tmp_path):
    """The writer leaves U+2028, U+0085 and friends raw; str.splitlines broke lines there and
    the reader then stopped, dropping every later record on resume."""
    from preftune.tracking import JsonlWriter

    prompts = ["a\u2028b", "c\x85d", "e\u2029f", "g\x1ch\x0bi\x0cj", "plain"]
    writer = JsonlWriter(tmp_path / "samples.jsonl")
    for step, prompt in enumerate(prompts):
        writer.write({"step": step, "prompt": prompt})
    writer.close()
    assert [r["prompt"] for r in read_jsonl(tmp_path / "samples.jsonl")] == prompts


def test_read_jsonl_drops_only_a_cut_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo', encoding="utf-8")
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


@pytest.mark.parametrize(("line", "problem"), [
    ('{"step": 2, "lo', r"invalid JSON: Unterminated string starting at \(column 13\)"),
    ("[" * 200_000 + "]" * 200_000, "invalid JSON: nested too deeply"),
    ('{"split": "eval"}', "no integer step"),
])
def test_read_jsonl_damaged_middle_line_is_one_line_error(tmp_path, line, problem):
    from preftune.checkpoint import CheckpointError

    path = tmp_path / "metrics.jsonl"
    path.write_text(f'{{"step": 1}}\n{line}\n{{"step": 3}}\n', encoding="utf-8")
    with pytest.raises(CheckpointError, match=rf"^{path}:2: damaged log line \({problem}\); "
                       r"fix or remove that line$"):
        read_jsonl(path)


def test_error_starts_its_own_line_after_a_progress_bar(capfd):
    """cli._fail ends a bar still on the terminal, and escapes what would break the line."""
    from preftune.cli import _fail
    from preftune.tracking import Progress

    bar = Progress(total=5, desc="dpo")
    bar.update({"loss": 0.5, "examples_per_second": 1.0})
    assert _fail(ValueError("field 'a\npreftune: error: forged' is bad"), debug=False) == 2
    err = capfd.readouterr().err
    assert err.endswith("\npreftune: error: field 'a\\npreftune: error: forged' is bad\n")
    assert len([line for line in err.split("\n") if line.startswith("preftune")]) == 1
