"""Run outputs that are not models: metrics.jsonl, samples.jsonl and the terminal progress."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


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


class Progress:
    """A progress bar over optimizer steps showing loss, reward accuracy, margin and speed."""

    def __init__(self, total: int, desc: str, enabled: bool = True, initial: int = 0) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True,
                        disable=not enabled, file=sys.stderr, initial=initial)

    def update(self, record: dict[str, Any]) -> None:
        shown = {"loss": f"{record['loss']:.4f}"}
        if "rewards/accuracies" in record:
            shown["acc"] = f"{record['rewards/accuracies']:.2f}"
            shown["margin"] = f"{record['rewards/margins']:.3f}"
        shown["ex/s"] = f"{record['examples_per_second']:.2f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


class RunLog:
    """What a run writes as it goes: metrics, samples, the progress bar. Disabled on ranks
    other than 0, so the loop calls it the same way in every process."""

    def __init__(self, out: Path, total: int, desc: str, initial: int, progress: bool,
                 enabled: bool = True) -> None:
        self.enabled = enabled
        self.evals: list[dict[str, Any]] = []
        if enabled:
            self.evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "eval"]
            self.metrics = JsonlWriter(out / "metrics.jsonl")
            self.samples = JsonlWriter(out / "samples.jsonl")
        self.bar = Progress(total, desc, enabled=enabled and progress, initial=initial)

    def train(self, record: dict[str, Any], write: bool) -> None:
        self.bar.update(record)
        if self.enabled and write:
            self.metrics.write(record)

    def eval(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.metrics.write(record)
        self.evals.append(record)
        self.note(f"eval step {record['step']}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in record.items() if isinstance(v, float)))

    def sample(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.samples.write(record)

    def note(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.enabled:
            self.metrics.close()
            self.samples.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a log file; a last line cut by a crash is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records
