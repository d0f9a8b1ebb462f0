"""The run report: PNG plots and one self-contained HTML page built from a run folder.

``preftune report OUTPUT_DIR`` reads what the training loop left in ``OUTPUT_DIR``
(``config.yaml``, ``metrics.jsonl``, ``samples.jsonl``, ``data_report.json``) and writes
``OUTPUT_DIR/report/``: one PNG per plot and ``report.html``, which embeds the plots as data
URIs and needs nothing else (no scripts, no external requests; it can be mailed or archived).

Only ``metrics.jsonl`` is required. A run still in progress is fine: the report shows what has
been logged so far, and an unfinished last line (no newline yet) is left out. A file that is
present but malformed is an error naming ``file:line``.

This module reads files only: it imports neither torch, transformers nor the training loop.
Matplotlib is imported when plots are drawn, through its object-oriented API on the Agg canvas,
so the caller's pyplot backend and global state are left alone.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import html
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import yaml_load
from .io import iter_jsonl, publish_dir

REPORT_DIR = "report"
HTML_NAME = "report.html"
TITLE_MARK = "preftune report</title>"  # ends the <title> render_html writes: a report of ours
FIGSIZE_IN = (5.6, 3.2)
DPI = 150  # drawn at 1.5x the size shown, sharp on high-density screens
PLOT_SIZE_PX = (round(FIGSIZE_IN[0] * DPI), round(FIGSIZE_IN[1] * DPI))  # (width, height)

USAGE = """usage: preftune report OUTPUT_DIR

Writes OUTPUT_DIR/report/: one PNG per metric plot and report.html, a self-contained page
(config, plots, first-vs-last eval summary, skipped data rows, policy-vs-reference samples)."""

# Metric keys in the order the summary lists them; any other numeric key follows, sorted.
METRIC_ORDER = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
    "lr",
    "tokens",
    "examples_per_second",
    "examples",
)
_NOT_METRICS = {"split", "step"}


@dataclass(frozen=True)
class PlotSpec:
    name: str  # file stem: <name>.png
    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...]  # (metric key, legend label)
    hline: float | None = None  # a reference level (chance accuracy, zero margin)
    ylim: tuple[float, float] | None = None


PLOTS = (
    PlotSpec("loss", "Loss", "loss", (("loss", "loss"),)),
    PlotSpec("accuracy", "Reward accuracy (chosen reward > rejected reward)", "accuracy",
             (("rewards/accuracies", "accuracy"),), hline=0.5, ylim=(-0.02, 1.02)),
    PlotSpec("margins", "Reward margin (chosen − rejected)", "margin",
             (("rewards/margins", "margin"),), hline=0.0),
    PlotSpec("rewards", "Implicit rewards", "reward",
             (("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")), hline=0.0),
    PlotSpec("logps", "Policy log-probabilities", "log-prob",
             (("logps/chosen", "chosen"), ("logps/rejected", "rejected"))),
    # eval_scorer: sampled completions judged at each eval (preftune.evalgen.training_judge)
    PlotSpec("win_rate", "Win rate of policy samples over reference samples", "win rate",
             (("generate/win_rate", "win rate"),), hline=0.5, ylim=(-0.02, 1.02)),
    PlotSpec("scores", "Mean score of sampled completions", "score",
             (("generate/score", "policy"), ("generate/reference_score", "reference"))),
    PlotSpec("kl", "KL(policy ‖ reference) of sampled completions", "nats",
             (("generate/kl", "KL"),), hline=0.0),
)
_SINGLE_COLORS = ("tab:blue", "tab:orange")  # train, eval of a one-metric plot
_PAIR_COLORS = ("tab:green", "tab:red")  # chosen, rejected


class ReportError(ValueError):
    """A run folder the report cannot be built from; str() is ``path[:line]: message``."""

    def __init__(self, path: str | Path, message: str, line: int | None = None) -> None:
        self.path, self.message, self.line = str(path), message, line
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {message}")


@dataclass
class Run:
    """What a run folder holds, checked and ready to show."""

    path: Path
    name: str
    finished: bool
    config: dict[str, Any] | None
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    data_reports: list[tuple[str, dict[str, Any]]]
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------- reading


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_jsonl(path: Path, notes: list[str]) -> list[tuple[int, Any]]:
    """(line number, parsed value) per non-blank line.

    The last line is left out, with a note, when it has no newline yet and does not parse:
    a writer is in the middle of it. Any other line that does not parse is an error.
    """
    try:
        return list(iter_jsonl(
            path, lenient=True, error=lambda number, problem: ReportError(path, problem, number),
            on_cut=lambda number: notes.append(
                f"{path.name}: left out the unfinished line {number}")))
    except OSError as e:
        raise ReportError(path, f"cannot read ({e.strerror})") from None


def _short(value: Any, limit: int = 60) -> str:
    """repr of a value quoted in an error, cut to about ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_step(path: Path, number: int, row: dict[str, Any]) -> None:
    step = row.get("step")
    # The bound keeps steps plottable (matplotlib converts them to floats) and printable.
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 2**63:
        raise ReportError(path, f"step: expected an integer in [0, 2**63), got {_short(step)}",
                          number)


def read_metrics(path: Path, notes: list[str]) -> tuple[list[dict], list[dict]]:
    """Train rows and eval rows, each sorted by step; known metrics are numbers (null -> nan)."""
    train: list[dict] = []
    evals: list[dict] = []
    for number, row in read_jsonl(path, notes):
        if not isinstance(row, dict):
            raise ReportError(path, f"expected a JSON object, got {type(row).__name__}", number)
        split = row.get("split")
        if split not in ("train", "eval"):
            raise ReportError(path, f"split: expected 'train' or 'eval', got {_short(split)}",
                              number)
        _check_step(path, number, row)
        for key in METRIC_ORDER:
            if key not in row:
                continue
            if row[key] is None:
                row[key] = math.nan
            elif not _is_number(row[key]):
                raise ReportError(path, f"{key}: expected a number, got {_short(row[key])}", number)
        (train if split == "train" else evals).append(row)
    train.sort(key=lambda r: r["step"])
    evals.sort(key=lambda r: r["step"])
    return train, evals


def read_samples(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    samples = []
    for number, row in read_jsonl(path, notes):
        if not isinstance(row, dict):
            raise ReportError(path, f"expected a JSON object, got {type(row).__name__}", number)
        _check_step(path, number, row)
        for key in ("prompt", "policy", "reference"):
            value = row.get(key)
            if value is None and key == "reference":
                continue
            if not isinstance(value, str):
                raise ReportError(path, f"{key}: expected a string, got {_short(value)}", number)
        samples.append(row)
    return samples


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ReportError(path, f"cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ReportError(path, f"not UTF-8 ({e.reason})") from None


def read_config(path: Path) -> dict[str, Any]:
    """A run's config.yaml, read as strictly as a recipe (no anchors, aliases or duplicate
    keys: a planted alias bomb cannot expand)."""
    try:
        config = yaml_load(_read_text(path))
    except RecursionError:
        raise ReportError(path, "invalid YAML (nested too deeply)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ReportError(path, problem, None if mark is None else mark.line + 1) from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ReportError(path, f"expected a mapping, got {type(config).__name__}")
    return config


def read_data_report(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ReportError(path, f"invalid JSON: {e.msg} (column {e.colno})", e.lineno) from None
    except RecursionError:
        raise ReportError(path, "invalid JSON (nested too deeply)") from None
    if not isinstance(report, dict) or not isinstance(report.get("counts", {}), dict):
        raise ReportError(path, 'expected an object {"counts": {reason: n}, ...}')
    return report


def load_run(run_dir: str | Path) -> Run:
    """Read and check a run folder; only metrics.jsonl is required."""
    path = Path(run_dir)
    if not path.is_dir():
        what = "not a folder" if path.exists() else "no such folder"
        raise ReportError(path, f"{what} (expected a run's output_dir)")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(metrics, "missing: not a run folder, or the run has not started")
    notes: list[str] = []
    train, evals = read_metrics(metrics, notes)
    config = read_config(path / "config.yaml") if (path / "config.yaml").is_file() else None
    samples_path = path / "samples.jsonl"
    samples = read_samples(samples_path, notes) if samples_path.is_file() else []
    reports = []
    for label, name in (("training data", "data_report.json"),
                        ("eval data", "eval_data_report.json")):
        if (path / name).is_file():
            reports.append((label, read_data_report(path / name)))
    return Run(path=path, name=path.resolve().name, finished=(path / "final").is_dir(),
               config=config, train=train, eval=evals, samples=samples, data_reports=reports,
               notes=notes)


# ---------------------------------------------------------------------------------- plots


def _points(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    hits = [(r["step"], float(r[key])) for r in rows if key in r]
    return [s for s, _ in hits], [v for _, v in hits]


def plots_for(run: Run) -> list[PlotSpec]:
    """The plots whose metrics the run logged (SFT: loss only)."""
    rows = run.train + run.eval
    return [spec for spec in PLOTS
            if any(key in row for key, _ in spec.series for row in rows)]


def draw_plot(spec: PlotSpec, run: Run, out: Path) -> None:
    """One PNG of PLOT_SIZE_PX: train as a thin line, eval as markers joined by a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    pair = len(spec.series) > 1
    for index, (key, label) in enumerate(spec.series):
        train_color, eval_color = ((_PAIR_COLORS[index],) * 2) if pair else _SINGLE_COLORS
        prefix = f"{label} · " if pair else ""
        steps, values = _points(run.train, key)
        if steps:
            ax.plot(steps, values, color=train_color, linewidth=0.9, alpha=0.55,
                    label=f"{prefix}train")
        steps, values = _points(run.eval, key)
        if steps:
            ax.plot(steps, values, color=eval_color, linewidth=1.8, marker="o", markersize=5,
                    label=f"{prefix}eval")
    if spec.hline is not None:
        ax.axhline(spec.hline, color="0.6", linewidth=0.8, linestyle=":", zorder=0)
    if spec.ylim is not None:
        ax.set_ylim(*spec.ylim)
    ax.set_title(spec.title, fontsize=11)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(spec.ylabel)
    ax.grid(True, color="0.92")
    ax.legend(fontsize=8, loc="best", ncols=2 if pair else 1)
    # No "Software: matplotlib x.y" chunk: the same run gives the same bytes across versions.
    fig.savefig(out, format="png", metadata={"Software": None})


# ---------------------------------------------------------------------------------- HTML


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, signed: bool = False) -> str:
    """Numbers for tables: ints with separators, floats to 4 decimals or 4 significant digits."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not _is_number(value):
        return str(value)
    if isinstance(value, int):
        return f"{value:+,}" if signed else f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    sign = "+" if signed else ""
    value += 0.0  # -0.0 -> 0.0
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:{sign}.3e}"
    return f"{value:{sign}.4f}"


def _config_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _flatten(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def summary_keys(run: Run) -> list[str]:
    present = {k for row in run.train + run.eval for k, v in row.items()
               if k not in _NOT_METRICS and _is_number(v)}
    return [k for k in METRIC_ORDER if k in present] + sorted(present - set(METRIC_ORDER))


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1d2430; background: #f6f7f9; margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; overflow-wrap: anywhere; }
h2 { font-size: 19px; margin: 34px 0 10px; border-bottom: 1px solid #d8dce3; padding-bottom: 4px; }
.sub { color: #5b6473; margin: 0 0 6px; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 10px; font-size: 13px;
         font-weight: 600; }
.done { background: #dff3e4; color: #17642f; }
.running { background: #fff1cf; color: #7a5600; }
.note { background: #fff8e1; border-left: 4px solid #e0a800; padding: 6px 12px; margin: 8px 0; }
table { border-collapse: collapse; background: #fff; font-size: 14px; margin: 6px 0; }
th, td { border: 1px solid #dde1e7; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #eef1f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.key, td code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
                  font-size: 13px; }
td.val { overflow-wrap: anywhere; max-width: 640px; }
.config-grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr));
          gap: 0 24px; align-items: start; }
.config-grid table { width: 100%; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(440px, 1fr)); gap: 14px; }
figure { background: #fff; border: 1px solid #dde1e7; margin: 0; padding: 6px; }
figure img { display: block; width: 100%; height: auto; }
.sample { background: #fff; border: 1px solid #dde1e7; border-radius: 6px; margin: 12px 0;
          padding: 10px 12px; }
.sample h3 { font-size: 14px; margin: 0 0 6px; color: #5b6473; }
.label { font-size: 12px; font-weight: 700; text-transform: uppercase; letter-spacing: .04em;
         color: #5b6473; margin: 6px 0 2px; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.pair.one { grid-template-columns: 1fr; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; margin: 0; padding: 8px 10px;
      border-radius: 4px; font: 13px/1.4 ui-monospace, "SFMono-Regular", Menlo, Consolas,
      monospace; max-height: 26em; overflow: auto; }
pre.prompt { background: #f1f3f6; max-height: 14em; }
pre.policy { background: #eaf3ff; }
pre.reference { background: #f4f0fa; }
details { margin: 10px 0; }
summary { cursor: pointer; font-weight: 600; }
.muted { color: #7a8391; }
"""

# The page may load images from data: URIs and use its inline style, nothing else.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _table(name: str, header: Sequence[str], rows: Sequence[Sequence[str]], classes: str) -> str:
    """Cells are already-escaped HTML; `classes` has one letter per column:
    k = key (monospace), v = text value, n = number (right-aligned)."""
    names = {"k": "key", "v": "val", "n": "num"}
    out = [f'<table class="{name}"><thead><tr>', *(f"<th>{h}</th>" for h in header),
           "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>")
        out += [f'<td class="{names[c]}">{cell}</td>' for c, cell in zip(classes, row, strict=True)]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _header(run: Run) -> list[str]:
    cfg = run.config or {}
    stage = "DPO" if any("rewards/margins" in r for r in run.train + run.eval) else "SFT"
    if stage == "DPO" and isinstance(cfg.get("loss"), str):
        stage = cfg["loss"].upper()
    last_train = run.train[-1]["step"] if run.train else None
    last_eval = run.eval[-1]["step"] if run.eval else None
    if run.finished:
        badge = '<span class="badge done">finished</span>'
    else:
        badge = '<span class="badge running">in progress or stopped (no final/ yet)</span>'
    facts = [f"stage {_e(stage)}"]
    for key in ("model", "reference", "dataset"):
        if cfg.get(key) is not None:
            facts.append(f"{key} <code>{_e(cfg[key])}</code>")
    steps = [f"last train step {fmt(last_train)}", f"last eval step {fmt(last_eval)}"]
    out = [f"<h1>{_e(run.name)}</h1>",
           f'<p class="sub">preftune run report · {badge}</p>',
           f'<p class="sub">{" · ".join(facts)}</p>',
           f'<p class="sub">{" · ".join(steps)} · folder <code>{_e(run.path)}</code></p>']
    if not run.finished and last_train is not None and (last_eval is None
                                                        or last_train > last_eval):
        out.append('<p class="note">No final eval yet: the eval columns show the latest eval '
                   f"(step {fmt(last_eval)}), {fmt(last_train - (last_eval or 0))} train "
                   "steps behind the latest train row.</p>")
    out += [f'<p class="note">{_e(n)}</p>' for n in run.notes]
    return out


def _summary(run: Run) -> list[str]:
    out = ["<h2>Summary</h2>"]
    keys = summary_keys(run)
    if not keys:
        return out + ['<p class="muted">No metrics logged yet.</p>']
    first = run.eval[0] if run.eval else {}
    last = run.eval[-1] if run.eval else {}
    train = run.train[-1] if run.train else {}
    last_label = "last eval" if run.finished else "latest eval"
    header = ["metric",
              f"first eval<br><span class=muted>step {fmt(first.get('step'))}</span>",
              f"{last_label}<br><span class=muted>step {fmt(last.get('step'))}</span>",
              "change",
              f"last train<br><span class=muted>step {fmt(train.get('step'))}</span>"]
    rows = []
    for key in keys:
        a, b = first.get(key), last.get(key)
        comparable = len(run.eval) > 1 and _is_number(a) and _is_number(b)
        change = b - a if comparable else None
        rows.append([_e(key), _e(fmt(a)), _e(fmt(b)), _e(fmt(change, signed=True)),
                     _e(fmt(train.get(key)))])
    return out + [_table("summary", header, rows, "knnnn")]


def _config(run: Run) -> list[str]:
    out = ["<h2>Configuration</h2>"]
    if run.config is None:
        return out + ['<p class="muted">No config.yaml in the run folder.</p>']
    items = _flatten(run.config)
    if not items:
        return out + ['<p class="muted">config.yaml is empty.</p>']
    half = (len(items) + 1) // 2
    tables = [_table("config", ["key", "value"],
                     [[_e(k), _e(_config_value(v))] for k, v in chunk], "kv")
              for chunk in (items[:half], items[half:]) if chunk]
    return out + ['<div class="config-grid">', *tables, "</div>"]


def _plots(plots: list[tuple[PlotSpec, bytes]]) -> list[str]:
    out = ["<h2>Training curves</h2>"]
    if not plots:
        return out + ['<p class="muted">No metrics logged yet.</p>']
    out.append('<div class="plots">')
    for spec, png in plots:
        data = base64.b64encode(png).decode("ascii")
        out.append(f'<figure id="plot-{_e(spec.name)}"><img src="data:image/png;base64,{data}" '
                   f'alt="{_e(spec.title)}" width="{PLOT_SIZE_PX[0]}" '
                   f'height="{PLOT_SIZE_PX[1]}"></figure>')
    return out + ["</div>"]


def _examples(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "<br>".join(_e(_config_value(v)) for v in value)
    return _e(_config_value(value))


def _data(run: Run) -> list[str]:
    out = ["<h2>Data: skipped rows</h2>"]
    if not run.data_reports:
        return out + ['<p class="muted">No data_report.json in the run folder.</p>']
    for label, report in run.data_reports:
        counts = report.get("counts") or {}
        examples = report.get("examples") or {}
        total = sum(v for v in counts.values() if _is_number(v))
        facts = [f"read {fmt(report.get('total_read'))}", f"kept {fmt(report.get('kept'))}",
                 f"skipped {fmt(total)}"]
        out.append(f"<p><b>{_e(label)}</b>: {_e(', '.join(facts))}</p>")
        if counts:
            rows = [[_e(reason), _e(fmt(n)), _examples(examples.get(reason))]
                    for reason, n in sorted(counts.items(), key=lambda kv: (-_num(kv[1]), kv[0]))]
            out.append(_table("skipped", ["reason", "rows", "first locations"], rows, "knv"))
        else:
            out.append('<p class="muted">No row was skipped.</p>')
    return out


def _num(value: Any) -> float:
    return float(value) if _is_number(value) else 0.0


def _sample_block(index: int, sample: dict[str, Any]) -> str:
    has_ref = sample.get("reference") is not None
    cols = [f'<div><div class="label">policy</div>'
            f'<pre class="policy">{_e(sample["policy"])}</pre></div>']
    if has_ref:
        cols.append(f'<div><div class="label">reference</div>'
                    f'<pre class="reference">{_e(sample["reference"])}</pre></div>')
    return (f'<div class="sample"><h3>prompt {index + 1}</h3>'
            f'<pre class="prompt">{_e(sample["prompt"])}</pre>'
            f'<div class="pair{"" if has_ref else " one"}">{"".join(cols)}</div></div>')


def _samples(run: Run) -> list[str]:
    out = ["<h2>Samples: policy vs reference</h2>"]
    if not run.samples:
        return out + ['<p class="muted">No samples.jsonl, or no sample taken yet.</p>']
    by_step: dict[int, list[dict]] = {}
    for sample in run.samples:
        by_step.setdefault(sample["step"], []).append(sample)
    steps = sorted(by_step, reverse=True)
    out.append(f"<p>Greedy completions at step {fmt(steps[0])} (the latest sampled step).</p>")
    out += [_sample_block(i, s) for i, s in enumerate(by_step[steps[0]])]
    for step in steps[1:]:
        out.append(f"<details><summary>step {fmt(step)} ({len(by_step[step])} prompts)"
                   "</summary>")
        out += [_sample_block(i, s) for i, s in enumerate(by_step[step])]
        out.append("</details>")
    return out


def _generation(run: Run) -> list[str]:
    """The section of ``preftune eval``'s eval.json (preftune.evalgen), when there is one."""
    path = run.path / "eval.json"
    if not path.is_file():
        return []
    out = ["<h2>Sampled completions: policy against reference</h2>"]
    try:
        r = json.loads(_read_text(path))
        w, s, kl, n = r["win_rate"], r["score"], r["kl"], r["length"]

        def ci(d: dict) -> str:
            spread = f" [{fmt(d['low'])}, {fmt(d['high'])}]" if d.get("low") is not None else ""
            return _e(fmt(d["mean"]) + spread)

        rows = [["mean score [95% interval]", ci(s["policy"]), ci(s["reference"])],
                ["length (tokens)", ci(n["policy"]), ci(n["reference"])],
                ["win rate [95% interval]", _e(f"{fmt(w['win_rate'])} [{fmt(w['win_rate_low'])}"
                                               f", {fmt(w['win_rate_high'])}]"), ""],
                ["ties, losses", _e(f"{fmt(w['tie_rate'])}, {fmt(w['loss_rate'])}"), ""],
                ["KL(policy ‖ reference), nats", _e(f"{fmt(kl['mean'])} ± {fmt(kl['stderr'])}"),
                 ""]]
        facts = (f"{fmt(r['n'])} samples of each of {fmt(r['prompts'])} prompts, scorer "
                 f"{r['scorer']}, temperature {r['temperature']}, top-p {r['top_p']}, seed "
                 f"{r['seed']}" + ("" if kl.get("exact_sampling") else
                                   "; KL not exact at this temperature/top-p"))
    except (ReportError, ValueError, KeyError, TypeError) as e:
        return [*out, f'<p class="note">eval.json could not be read ({_e(e)})</p>']
    return [*out, f'<p class="sub">{_e(facts)}</p>',
            _table("summary", ["", "policy", "reference"], rows, "knn")]


def render_html(run: Run, plots: list[tuple[PlotSpec, bytes]]) -> str:
    """The whole page; every text from the run folder goes through html.escape."""
    body = [*_header(run), *_summary(run), *_generation(run), *_plots(plots), *_config(run),
            *_data(run), *_samples(run)]
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(run.name)} · preftune report</title>",
        f"<style>{CSS}</style></head><body><main>",
        *body,
        "</main></body></html>",
        "",
    ])


# ---------------------------------------------------------------------------------- writing


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report/`` (PNG per plot + report.html); returns the HTML path.

    Everything is built in a temporary folder beside it and renamed into place, so a crash
    leaves either the previous report or the new one, never a half-written one.
    """
    with _writing(Path(run_dir)):
        return _write_report(run_dir)


def _write_report(run_dir: str | Path) -> Path:
    run = load_run(run_dir)
    target = run.path / REPORT_DIR
    _check_replaceable(target)  # before any work; checked again just before the rename
    try:
        staging = Path(tempfile.mkdtemp(prefix=".report-new-", dir=run.path))
    except OSError as e:
        raise ReportError(run.path, f"cannot write the report ({e.strerror})") from None
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; a report is meant to be shared
        plots = []
        specs = plots_for(run)
        if specs:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ReportError(run.path, "plots need matplotlib: pip install "
                                  "'matplotlib>=3.8'") from None
        for spec in specs:
            png = staging / f"{spec.name}.png"
            draw_plot(spec, run, png)
            plots.append((spec, png.read_bytes()))
        (staging / HTML_NAME).write_text(render_html(run, plots), encoding="utf-8")
        _check_replaceable(target)  # only a report preftune wrote is deleted
        publish_dir(staging, target, old=run.path / f".report-old-{secrets.token_hex(4)}")
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise ReportError(target, f"cannot write the report ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target / HTML_NAME


def _ours(target: Path) -> bool:
    """Whether `target` is a report folder preftune wrote: report.html with preftune's title,
    beside nothing but PNG plots (plots an older version drew are replaced with it)."""
    if target.is_symlink() or not target.is_dir():
        return False
    try:
        with (target / HTML_NAME).open("rb") as f:
            head = f.read(4096)
        names = [p.name for p in target.iterdir()]
    except OSError:
        return False
    return (TITLE_MARK.encode() in head
            and all(n == HTML_NAME or n.endswith(".png") for n in names))


def _check_replaceable(target: Path) -> None:
    if (target.exists() or target.is_symlink()) and not _ours(target):
        what = "a folder" if target.is_dir() and not target.is_symlink() else "a file"
        raise ReportError(target, f"{what} preftune did not write is in the way; move it "
                          "elsewhere to write the report")


@contextlib.contextmanager
def _writing(run_dir: Path) -> Iterator[None]:
    """One report writer at a time per run folder (the training's final report and a
    `preftune report` beside it): an flock on the folder itself, so the report that lands last
    is built from what was logged last. No lock where the file system has none."""
    try:
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def main(argv: Sequence[str]) -> int:
    """``preftune report OUTPUT_DIR`` (argv is what follows ``report``)."""
    args = list(argv)
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        path = write_report(args[0])
    except ReportError as e:
        print(f"preftune: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
