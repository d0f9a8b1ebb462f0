"""The run report: plots and HTML page from a run folder written as the training loop writes it."""

from __future__ import annotations

import base64
import json
import math
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from PIL import Image

from preftune import report
from preftune.report import PLOT_SIZE_PX, ReportError, main, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DPO_PLOTS = ["loss", "accuracy", "margins", "rewards", "logps"]

PROMPT = '\n\nHuman: what does <script>alert("x")</script> & co do?\n\nAssistant:'
POLICY = 'It runs "code" & ends the page: </pre></div><script>steal()</script>'
REFERENCE = "I don't know <b>bold</b> & 'quotes'"
SKIP_REASON = "chosen == rejected <identical>"


# ------------------------------------------------------------------------- run folders


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")


def _dpo_eval(step: int, loss: float, acc: float) -> dict:
    margin = 0.05 * step / 10
    return {"split": "eval", "step": step, "examples": step * 8, "loss": loss,
            "rewards/chosen": margin / 2, "rewards/rejected": -margin / 2,
            "rewards/accuracies": acc, "rewards/margins": margin,
            "logps/chosen": -120.0 + step * 0.1, "logps/rejected": -130.0 - step * 0.2}


def _dpo_train(step: int) -> dict:
    loss = 0.4109 if step == 20 else math.log(2) - 0.012 * step
    return {"split": "train", "step": step, "examples": step * 8, "loss": loss,
            "rewards/chosen": 0.003 * step, "rewards/rejected": -0.002 * step,
            "rewards/accuracies": min(1.0, 0.5 + 0.02 * step),
            "rewards/margins": 0.005 * step, "logps/chosen": -121.0 + 0.1 * step,
            "logps/rejected": -131.0 - 0.2 * step, "grad_norm": 3.5 - 0.05 * step,
            "lr": 5e-7 * min(1.0, step / 10), "tokens": step * 1000,
            "examples_per_second": 12.5}


def _config(stage: str) -> dict:
    config = {"model": "tiny-llama", "dataset": "hh-rlhf/helpful-base/test.jsonl.gz",
              "dataset_format": None, "lr": 5e-7, "batch_size": 8, "max_steps": 20,
              "eval_every": 10, "strict_data": False, "output_dir": "runs/x"}
    if stage == "dpo":
        config |= {"reference": "tiny-llama-sft", "loss": "dpo", "beta": 0.1,
                   "label_smoothing": 0.0}
    return config


def make_dpo_run(folder: Path) -> Path:
    """20 train steps, evals at 0, 10 and 20, samples at 10 and 20, a finished run (final/)."""
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(_config("dpo"), sort_keys=False))
    rows = [_dpo_eval(0, math.log(2), 0.5)]
    for step in range(1, 21):
        rows.append(_dpo_train(step))
        if step == 10:
            rows.append(_dpo_eval(10, 0.55, 0.6875))
    rows.append(_dpo_eval(20, 0.4375, 0.8125))
    _write_jsonl(folder / "metrics.jsonl", rows)
    samples = []
    for step in (10, 20):
        samples += [{"step": step, "prompt": PROMPT, "policy": f"{POLICY} @{step}",
                     "reference": REFERENCE},
                    {"step": step, "prompt": "Plain prompt", "policy": f"plain policy @{step}",
                     "reference": "plain reference"}]
    _write_jsonl(folder / "samples.jsonl", samples)
    (folder / "data_report.json").write_text(json.dumps({
        "counts": {"empty chosen": 3, SKIP_REASON: 1},
        "examples": {"empty chosen": ["line 4", "line 9", "line 17"], SKIP_REASON: ["line 40"]},
        "total_read": 104, "kept": 100}))
    (folder / "final").mkdir()
    return folder


def make_sft_run(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(_config("sft"), sort_keys=False))
    rows = [{"split": "eval", "step": 0, "examples": 0, "loss": 2.5}]
    for step in range(1, 11):
        rows.append({"split": "train", "step": step, "examples": 8 * step, "loss": 2.5 - step / 10,
                     "grad_norm": 1.0, "lr": 1e-5, "tokens": 500 * step,
                     "examples_per_second": 20.0})
    rows.append({"split": "eval", "step": 10, "examples": 80, "loss": 1.75})
    _write_jsonl(folder / "metrics.jsonl", rows)
    _write_jsonl(folder / "samples.jsonl",
                 [{"step": 10, "prompt": "Say hi", "policy": "hi <there>"}])
    (folder / "final").mkdir()
    return folder


# ------------------------------------------------------------------------- reading the page


class Page(HTMLParser):
    """What a browser would see: tags, images, table rows, <pre> texts by class."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.rows: list[list[str]] = []
        self.table_rows: dict[str, list[list[str]]] = {}
        self._table = ""
        self.pres: list[tuple[str, str]] = []
        self.title = ""
        self.h1 = ""
        self._cell: list[str] | None = None
        self._pre: tuple[str, list[str]] | None = None
        self._in: str | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.links += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if tag == "img":
            self.images.append(a)
        elif tag == "table":
            self._table = a.get("class", "")
        elif tag == "tr":
            self.rows.append([])
            self.table_rows.setdefault(self._table, []).append(self.rows[-1])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "pre":
            self._pre = (a.get("class", ""), [])
        elif tag in ("title", "h1"):
            self._in = tag

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join(" ".join(self._cell).split()))
            self._cell = None
        elif tag == "pre" and self._pre is not None:
            self.pres.append((self._pre[0], "".join(self._pre[1])))
            self._pre = None
        elif tag in ("title", "h1"):
            self._in = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._pre is not None:
            self._pre[1].append(data)
        if self._in == "title":
            self.title += data
        elif self._in == "h1":
            self.h1 += data

    def row(self, table: str, first: str) -> list[str]:
        matches = [r for r in self.table_rows.get(table, []) if r and r[0] == first]
        assert len(matches) == 1, (first, matches)
        return matches[0]


def assert_png(path: Path) -> bytes:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == PLOT_SIZE_PX
        image.load()
        assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20  # not blank
    return data


# ------------------------------------------------------------------------- tests


def test_dpo_report_plots_and_page(tmp_path):
    run = make_dpo_run(tmp_path / 'dpo <run> & "co"')
    html_path = write_report(run)
    assert html_path == run / "report" / "report.html"
    assert sorted(p.name for p in (run / "report").iterdir()) == sorted(
        [f"{n}.png" for n in DPO_PLOTS] + ["report.html"])
    pngs = {name: assert_png(run / "report" / f"{name}.png") for name in DPO_PLOTS}

    text = html_path.read_text(encoding="utf-8")
    page = Page(text)
    # One <img> per plot, in order, whose data URI is exactly the PNG file.
    assert len(page.images) == len(DPO_PLOTS)
    prefix = "data:image/png;base64,"
    for name, image in zip(DPO_PLOTS, page.images, strict=True):
        assert image["src"].startswith(prefix)
        assert base64.b64decode(image["src"][len(prefix):], validate=True) == pngs[name]
    # Self-contained: every src/href is inline, no script anywhere.
    assert all(link.startswith("data:") for link in page.links), page.links
    assert "script" not in page.tags
    assert "<script>" not in text and "</pre></div><script>" not in text

    # User text is escaped: it round-trips through the parser as text, not markup.
    assert page.h1 == 'dpo <run> & "co"'
    assert page.title.startswith('dpo <run> & "co"')
    latest_policy = [t for c, t in page.pres if c == "policy"]
    assert latest_policy[:2] == [f"{POLICY} @20", "plain policy @20"]  # latest step first
    assert f"{POLICY} @10" in latest_policy  # the earlier step is there too (collapsed)
    assert [t for c, t in page.pres if c == "prompt"].count(PROMPT) == 2
    assert [t for c, t in page.pres if c == "reference"].count(REFERENCE) == 2
    assert text.index("@20") < text.index("<details>") < text.index("@10")

    # Summary: first eval vs last eval, the change, and the last train row.
    assert page.row("summary", "loss") == ["loss", "0.6931", "0.4375", "-0.2556", "0.4109"]
    assert page.row("summary", "rewards/accuracies") == ["rewards/accuracies", "0.5000", "0.8125",
                                              "+0.3125", "0.9000"]
    assert page.row("summary", "tokens") == ["tokens", "—", "—", "—", "20,000"]
    assert page.row("summary", "lr") == ["lr", "—", "—", "—", "5.000e-07"]
    assert any("first eval step 0" in c for c in page.table_rows["summary"][0])
    assert any("last eval step 20" in c for c in page.table_rows["summary"][0])

    # Config and data report.
    assert page.row("config", "beta") == ["beta", "0.1"]
    assert page.row("config", "dataset_format") == ["dataset_format", "null"]
    assert page.row("config", "model") == ["model", "tiny-llama"]
    assert page.row("skipped", SKIP_REASON) == [SKIP_REASON, "1", "line 40"]
    assert page.row("skipped", "empty chosen") == ["empty chosen", "3", "line 4 line 9 line 17"]
    assert "read 104, kept 100, skipped 4" in " ".join(text.split())
    assert "finished" in text


def test_sft_report_has_loss_plot_only(tmp_path):
    run = make_sft_run(tmp_path / "sft")
    html_path = write_report(run)
    assert sorted(p.name for p in html_path.parent.iterdir()) == ["loss.png", "report.html"]
    assert_png(html_path.parent / "loss.png")
    page = Page(html_path.read_text(encoding="utf-8"))
    assert len(page.images) == 1 and page.images[0]["alt"] == "Loss"
    assert page.row("summary", "loss") == ["loss", "2.5000", "1.7500", "-0.7500", "1.5000"]
    assert [r[0] for r in page.table_rows["summary"][1:]] == [
        "loss", "grad_norm", "lr", "tokens", "examples_per_second", "examples"]
    assert [c for c, _ in page.pres] == ["prompt", "policy"]  # no reference column
    assert ("policy", "hi <there>") in page.pres


def test_run_in_progress(tmp_path):
    """No final eval and no final/ yet, and a last line still being written."""
    run = tmp_path / "live"
    run.mkdir()
    rows = [_dpo_eval(0, math.log(2), 0.5)] + [_dpo_train(s) for s in range(1, 8)]
    _write_jsonl(run / "metrics.jsonl", rows)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"split": "train", "step": 8, "loss": 0.6')
    html_path = write_report(run)
    assert len(list(html_path.parent.glob("*.png"))) == len(DPO_PLOTS)
    text = html_path.read_text(encoding="utf-8")
    page = Page(text)
    loss_row = page.row("summary", "loss")
    assert loss_row[1:4] == ["0.6931", "0.6931", "—"]  # latest eval is still the step-0 one
    assert loss_row[4] == f"{math.log(2) - 0.012 * 7:.4f}"
    assert any("latest eval step 0" in c for c in page.table_rows["summary"][0])
    assert "in progress" in text
    assert "No final eval yet" in text
    assert "unfinished line 9" in text
    assert "No config.yaml" in text and "No data_report.json" in text and "No samples" in text


def test_empty_metrics_gives_a_page_without_plots(tmp_path):
    run = tmp_path / "starting"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    html_path = write_report(run)
    assert [p.name for p in html_path.parent.iterdir()] == ["report.html"]
    assert "No metrics logged yet" in html_path.read_text(encoding="utf-8")


def test_rewrite_replaces_report_and_crash_keeps_the_old_one(tmp_path, monkeypatch):
    run = make_sft_run(tmp_path / "run")
    first = write_report(run).read_bytes()
    (run / "report" / "stale.png").write_bytes(b"a plot an older report drew")
    assert write_report(run).read_bytes() == first  # same run, same page
    assert sorted(p.name for p in (run / "report").iterdir()) == ["loss.png", "report.html"]

    def crash(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, "render_html", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_report(run)
    assert (run / "report" / "report.html").read_bytes() == first
    assert_png(run / "report" / "loss.png")
    assert sorted(p.name for p in run.iterdir()) == [
        "config.yaml", "final", "metrics.jsonl", "report", "samples.jsonl"]

    shutil.rmtree(run / "report")
    with pytest.raises(RuntimeError):
        write_report(run)
    assert not any(p.name.startswith((".report", "report")) for p in run.iterdir())


def test_main_prints_the_html_path(tmp_path, capsys):
    run = make_sft_run(tmp_path / "sft")
    assert main([str(run)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(run / "report" / "report.html") and err == ""


def _error(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("preftune: error: ")
    return err.strip()


def test_errors_name_file_and_line(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main([str(missing)]) == 2
    assert _error(capsys) == f"preftune: error: {missing}: no such folder (expected a run's " \
                             "output_dir)"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert _error(capsys).startswith(f"preftune: error: {empty / 'metrics.jsonl'}: missing")

    run = make_dpo_run(tmp_path / "bad-json")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[2] = '{"split": "train", "step": 2, "loss": 0.6,}\n'
    (run / "metrics.jsonl").write_text("".join(lines))
    assert main([str(run)]) == 2
    assert _error(capsys).startswith(
        f"preftune: error: {run / 'metrics.jsonl'}:3: invalid JSON")
    assert not (run / "report").exists()

    lines[2] = json.dumps({"split": "train", "step": 2, "loss": "high"}) + "\n"
    (run / "metrics.jsonl").write_text("".join(lines))
    assert main([str(run)]) == 2
    assert _error(capsys) == (f"preftune: error: {run / 'metrics.jsonl'}:3: loss: expected a "
                              "number, got 'high'")

    lines[2] = json.dumps({"split": "test", "step": 2}) + "\n"
    (run / "metrics.jsonl").write_text("".join(lines))
    with pytest.raises(ReportError, match=r"metrics\.jsonl:3: split: expected 'train' or 'eval'"):
        write_report(run)

    run = make_dpo_run(tmp_path / "bad-samples")
    with (run / "samples.jsonl").open("a") as f:
        f.write('{"step": 20, "prompt": "p", "policy": 5}\n')
    with pytest.raises(ReportError, match=r"samples\.jsonl:5: policy: expected a string"):
        write_report(run)

    assert main([]) == 2
    assert capsys.readouterr().err.startswith("usage: preftune report OUTPUT_DIR")


def test_report_does_not_import_torch(tmp_path):
    run = make_dpo_run(tmp_path / "run")
    code = ("import sys; from preftune.report import write_report; "
            f"write_report({str(run)!r}); "
            "bad = [m for m in ('torch', 'transformers', 'preftune.train') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install chromium): "
                           "cannot render report.html in a real browser")
def test_chromium_renders_the_page(tmp_path):
    run = make_dpo_run(tmp_path / "run")
    html_path = write_report(run)
    shot = tmp_path / "screenshot.png"
    subprocess.run(
        [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--no-first-run",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={shot}",
         "--window-size=1200,2000", html_path.resolve().as_uri()],
        check=True, timeout=90, capture_output=True)
    assert shot.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(shot) as image:
        assert image.size == (1200, 2000)
        pixels = image.convert("RGB")
        colors = pixels.getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 200  # text and plots, not a blank page
        background = max(colors)[0] / (1200 * 2000)
        assert background < 0.9  # the page is not mostly one flat color


@pytest.mark.parametrize(("line", "message"), [
    # 400 digits parse as a Python int, then failed in matplotlib with a traceback
    (json.dumps({"split": "train", "step": int("9" * 400), "loss": 0.6}),
     "step: expected an integer in [0, 2**63), got " + "9" * 57 + "..."),
    ('{"split": "train", "step": ' + "1" * 5000 + "}",  # over Python's 4300-digit limit
     "invalid JSON: Exceeds the limit (4300 digits) for integer string conversion: value has "
     "5000 digits"),
    ("[" * 200_000 + "]" * 200_000, "invalid JSON: nested too deeply"),
])
def test_hostile_metrics_line_is_one_line_error(tmp_path, capsys, line, message):
    run = make_dpo_run(tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[2] = line + "\n"
    (run / "metrics.jsonl").write_text("".join(lines))
    assert main([str(run)]) == 2
    assert _error(capsys) == f"preftune: error: {run / 'metrics.jsonl'}:3: {message}"
    assert not (run / "report").exists()


def test_a_planted_yaml_alias_in_config_is_one_line(tmp_path):
    """config.yaml is read without expanding aliases: the report refuses it in one line."""
    from pathlib import Path

    from preftune.report import ReportError, read_config

    bomb = Path(__file__).parent / "fixtures" / "bad" / "alias_bomb.yaml"
    path = tmp_path / "config.yaml"
    path.write_text(bomb.read_text())
    with pytest.raises(ReportError, match="anchor or alias") as e:
        read_config(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
