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
