"""Run outputs that are not models: metrics.jsonl, samples.jsonl, the terminal progress, and
the optional metric sinks chosen by `report_to` (TensorBoard, Weights & Biases).

metrics.jsonl is always written. Each sink gets the same records under the same names: every
numeric value of a record (bools as 0/1; strings and other values are left out) under
``<split>/<key>``, e.g. ``train/loss``, ``train/rewards/accuracies``, ``eval/logps/chosen``,
``train/lr``, with the record's ``step`` (the optimizer step) as the x axis. The ``split`` and
``step`` keys themselves are not metrics. Train records reach the sinks when they reach
metrics.jsonl (log steps and non-finite steps). The samples of one sampling round are one
``samples`` entry: a markdown table of prompt / policy / reference in TensorBoard's text tab, a
``wandb.Table`` in W&B; the resolved config is TensorBoard text ``config`` and W&B's run config.

Where they go: TensorBoard event files in ``<output_dir>/tensorboard/``; the W&B run in
``<output_dir>/wandb/`` (project ``$WANDB_PROJECT``, default ``preftune``; named after the output
folder; ``WANDB_MODE=offline`` works without network or account). A resumed run keeps its W&B
run id (kept in ``wandb/preftune-run-id``; ``$WANDB_RUN_ID`` overrides it) and TensorBoard drops
the events past the resumed step, as metrics.jsonl does. W&B cannot forget the steps logged
after the checkpoint by the run that crashed; they stay in its history.
"""

from __future__ import annotations

import contextlib
import html
import importlib
import json
import os
import secrets
import string
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from tqdm.auto import tqdm
from tqdm.std import tqdm as std_tqdm

from .config import ConfigError
from .io import iter_jsonl


class JsonlWriter:
    """Appends one JSON object per line and flushes, so a crash loses no logged line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def on_terminal() -> bool:
    """Whether stderr is a terminal: only then are progress bars redrawn in place."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


PLAIN_LINES = 20  # lines a run prints over its steps when stderr is not a terminal


class Progress:
    """Progress over optimizer steps showing loss, reward accuracy, margin and speed: a bar
    on a terminal; elsewhere (a log file, a pipe) a plain line every ``total / PLAIN_LINES``
    steps and at the last, so the log holds no carriage-return redraws."""

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0) -> None:
        self.plain = enabled and not on_terminal()
        self.total, self.desc, self.start, self.first = total, desc, time.monotonic(), initial
        self.step = initial  # the optimizer step (a disabled tqdm bar does not count)
        self.paced: tuple[int, float] | None = None  # (step, time) the pace is measured from
        self.every = max(1, total // PLAIN_LINES)
        self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True,
                        disable=not enabled or self.plain, file=sys.stderr, initial=initial)

    def update(self, record: dict[str, Any]) -> None:
        shown = {"loss": f"{record['loss']:.4f}"}
        if "rewards/accuracies" in record:
            shown["acc"] = f"{record['rewards/accuracies']:.2f}"
            shown["margin"] = f"{record['rewards/margins']:.3f}"
        shown["ex/s"] = f"{record['examples_per_second']:.2f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)
        self.step += 1
        step = self.step
        now = time.monotonic()
        if self.paced is None:  # the pace counts from the end of this run's first step
            self.paced = (step, now)
        if self.plain and (step % self.every == 0 or step == self.total):
            line = (f"{self.desc} step {step}/{self.total}: "
                    + " ".join(f"{k} {v}" for k, v in shown.items())
                    + f", {duration(now - self.start)} elapsed")
            if step > self.paced[0]:
                pace = (now - self.paced[1]) / (step - self.paced[0])
                line += f", {duration(pace * (self.total - step))} left"
            print(line, file=sys.stderr)

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def warn(message: str) -> None:
    """One warning line on stderr, in the form every preftune warning takes."""
    print(f"preftune: warning: {message}", file=sys.stderr)


def duration(seconds: float) -> str:
    """``'42s'``, ``'3m05s'``, ``'2h07m'``: a span of time for a progress line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def quiet_third_party() -> None:
    """Keep a run's output to preftune's own lines: no FutureWarnings from other packages,
    no download or weight-loading bars and no retry chatter from transformers or the hub
    client (their errors still surface as preftune's one-line errors)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(?!preftune)")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with contextlib.suppress(ImportError):
        import huggingface_hub.utils as hub_utils

        hub_utils.disable_progress_bars()
        hub_utils.logging.set_verbosity_error()
    with contextlib.suppress(ImportError):
        import transformers.utils.logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def metric_values(record: dict[str, Any]) -> dict[str, float]:
    """A record's numeric values named ``<split>/<key>``: what every sink logs at its step."""
    split = record.get("split", "train")
    return {f"{split}/{key}": float(value) for key, value in record.items()
            if key not in ("split", "step") and isinstance(value, int | float)}


def _markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        text = html.escape(str(value), quote=False).replace("|", "&#124;")
        return text.replace("\r\n", "\n").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row if key != "step"))


class TensorBoardSink:
    """Scalars, sample tables and the config as text, in ``<out>/tensorboard``."""

    def __init__(self, out: Path, initial: int, config: dict[str, Any] | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard hides the events an earlier run wrote from purge_step on: after the
        # resumed step, or all of them when the run starts over, as truncate_logs does.
        self.writer = SummaryWriter(str(out / "tensorboard"),
                                    purge_step=initial + 1 if initial else 0)
        if config:
            self.writer.add_text("config", _markdown_table(
                [{"key": k, "value": v} for k, v in config.items()], ["key", "value"]), initial)
            self.writer.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        self.writer.add_text("samples", _markdown_table(rows, _columns(rows)), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run in ``<out>/wandb``, with ``step`` as the x axis of every metric."""

    ID_FILE = "preftune-run-id"

    def __init__(self, out: Path, initial: int, config: dict[str, Any] | None,
                 wandb: ModuleType) -> None:
        self.wandb = wandb
        folder = out / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / self.ID_FILE
        run_id = os.environ.get("WANDB_RUN_ID")
        if not run_id and initial > 0 and id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        if not run_id:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits)
                             for _ in range(8))
        try:
            self.run = wandb.init(dir=str(out), config=config or {}, name=out.resolve().name,
                                  project=os.environ.get("WANDB_PROJECT", "preftune"),
                                  id=run_id, resume="allow")
        except wandb.errors.Error as e:
            message = " ".join(str(e).split())
            raise ConfigError(f"report_to: wandb could not start a run ({message}); log in with "
                              f"`wandb login` or set WANDB_MODE=offline") from None
        id_file.write_text(self.run.id + "\n", encoding="utf-8")
        self.run.define_metric("step", hidden=True)
        for name in ("train/*", "eval/*", "samples"):
            self.run.define_metric(name, step_metric="step")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"step": step, **values})

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        columns = _columns(rows)
        table = self.wandb.Table(columns=columns,
                                 data=[[str(row.get(c, "")) for c in columns] for row in rows])
        self.run.log({"step": step, "samples": table})

    def close(self) -> None:
        self.run.finish()


def _import_sink(name: str) -> ModuleType:
    """The package a sink needs (names were checked by the config), or a one-line
    ConfigError naming the extra to install."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(f"report_to: {name} needs the '{name}' package "
                          f"(pip install 'preftune[{name}]')") from None


class RunLog:
    """What a run writes as it goes: metrics, samples, the progress bar, and the `report_to`
    sinks. Disabled on ranks other than 0, so the loop calls it the same way in every process;
    sinks exist only where it is enabled."""

    def __init__(self, out: Path, total: int, desc: str, initial: int, progress: bool,
                 enabled: bool = True, *, report_to: Sequence[str] = (),
                 config: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.evals: list[dict[str, Any]] = []
        self.sinks: list[TensorBoardSink | WandbSink] = []
        self._samples: list[dict[str, Any]] = []  # the sampling round not yet sent to the sinks
        if enabled:
            # Every package first: a missing one stops the run before anything is opened.
            modules = {name: _import_sink(name) for name in dict.fromkeys(report_to)}
            self.evals = [r for r in read_jsonl(out / "metrics.jsonl")
                          if r.get("split") == "eval"]
            self.metrics = JsonlWriter(out / "metrics.jsonl")
            self.samples = JsonlWriter(out / "samples.jsonl")
            try:
                for name, module in modules.items():
                    self.sinks.append(TensorBoardSink(out, initial, config) if name == "tensorboard"
                                      else WandbSink(out, initial, config, module))
            except BaseException:
                self._close_outputs()
                raise
        self.bar = Progress(total, desc, enabled=enabled and progress, initial=initial)

    def train(self, record: dict[str, Any], write: bool) -> None:
        self.bar.update(record)
        if self.enabled:
            self._send_samples()
            if write:
                self.metrics.write(record)
                self._send(record)

    def eval(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._send_samples()
        self.metrics.write(record)
        self._send(record)
        self.evals.append(record)
        self.note(f"eval step {record['step']}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in record.items() if isinstance(v, float)))

    def sample(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.samples.write(record)
        if self.sinks:
            if self._samples and self._samples[0]["step"] != record["step"]:
                self._send_samples()
            self._samples.append(record)

    def note(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.enabled:
            self._send_samples()
            self._close_outputs()

    def _send(self, record: dict[str, Any]) -> None:
        if self.sinks:
            values = metric_values(record)
            for sink in self.sinks:
                sink.scalars(record["step"], values)

    def _send_samples(self) -> None:
        if self._samples:
            rows, self._samples = self._samples, []
            for sink in self.sinks:
                sink.samples(rows[0]["step"], rows)

    def _close_outputs(self) -> None:
        self.metrics.close()
        self.samples.close()
        while self.sinks:
            self.sinks.pop().close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a run's log (metrics.jsonl, samples.jsonl): one JSON object with an integer
    ``step`` per line; none if the file is missing.

    A last line without its newline that does not parse was cut by a crash and is dropped; any
    other line that is not such a record is a CheckpointError naming the file and line, since
    resuming past it would lose the lines after it."""
    if not path.is_file():
        return []
    from .checkpoint import CheckpointError

    def damaged(number: int, problem: str) -> CheckpointError:
        return CheckpointError(f"{path}:{number}: damaged log line ({problem}); fix or "
                               "remove that line")

    records = []
    for number, record in iter_jsonl(path, lenient=True, error=damaged):
        problem = _log_record_problem(record)
        if problem:
            raise damaged(number, problem)
        records.append(record)
    return records


def _log_record_problem(record: Any) -> str:
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, expected an object"
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return "no integer step"
    return ""


def end_progress_bars() -> None:
    """Close every progress bar still on the terminal, so that what is printed next (an error)
    starts on a line of its own rather than after the bar's text."""
    for bar in list(getattr(std_tqdm, "_instances", ())):  # every tqdm class registers there
        with contextlib.suppress(Exception):
            bar.close()
