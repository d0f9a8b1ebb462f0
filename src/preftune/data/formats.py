"""Read preference pairs from local files or the Hugging Face Hub.

Every reader yields :class:`PreferencePair` objects. Rows that cannot be turned into a pair
are skipped and counted, per reason, in a :class:`SkipReport`; nothing is dropped silently.
This module knows nothing of tokenizers or torch.

Formats (detected from the fields of the first record, or forced with ``format=``):

``hh``
    Anthropic HH-RLHF: ``chosen``/``rejected`` full transcripts with ``"\\n\\nHuman:"`` /
    ``"\\n\\nAssistant:"`` turns. The prompt is the chosen transcript up to and including its
    last ``"\\n\\nAssistant:"``; the responses are the rest (leading space kept).
``shp``
    Stanford Human Preferences: ``history``, ``human_ref_A``, ``human_ref_B``, ``labels``
    (1 = A preferred), ``score_A``, ``score_B``. Prompt ``"\\n\\nHuman: " + history +
    "\\n\\nAssistant:"``, responses ``" " + text``, as in the original DPO code.
``stack-exchange-paired``
    ``question``, ``response_j`` (preferred), ``response_k``. Rendered in the same HH style as
    SHP: prompt ``"\\n\\nHuman: " + question + "\\n\\nAssistant:"``, responses ``" " + text``.
``explicit``
    ``prompt``/``chosen``/``rejected`` strings, used as they are.
``implicit``
    ``chosen``/``rejected`` strings (no HH markers) that share a prompt, see
    :func:`split_shared_prompt`.
``conversational``
    TRL style: ``prompt`` a list of messages, ``chosen``/``rejected`` lists of assistant
    messages (full conversations that start with the prompt messages are accepted and split;
    without ``prompt`` the longest shared message prefix is the prompt). Also ShareGPT /
    LLaMA-Factory style: ``conversations`` [{from, value}] plus ``chosen``/``rejected``
    {from, value}, with from human/user -> user, gpt/assistant -> assistant, system -> system
    and an optional top-level ``system`` string.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import math
import os
import re
import reprlib
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from preftune.io import json_problem

Message = dict[str, str]

DatasetFormat = Literal["hh", "shp", "stack-exchange-paired", "explicit", "implicit",
                        "conversational"]
FORMATS: tuple[str, ...] = get_args(DatasetFormat)  # the one list; config.py imports it

_FORMAT_FIELDS = {
    "hh": "chosen+rejected transcripts with '\\n\\nAssistant:' turns",
    "shp": "history+human_ref_A+human_ref_B+labels+score_A+score_B",
    "stack-exchange-paired": "question+response_j+response_k",
    "explicit": "prompt+chosen+rejected strings",
    "implicit": "chosen+rejected strings",
    "conversational": "prompt+chosen+rejected message lists, chosen+rejected message lists, "
    "or conversations+chosen+rejected (ShareGPT)",
}

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
# Turn marker used to find the prompt/response boundary of implicit pairs.
_TURN_MARKER = "Assistant:"

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}

_LINE_SUFFIXES = (".jsonl", ".ndjson")
_FILE_SUFFIXES = (".json", *_LINE_SUFFIXES, ".gz", ".parquet", ".pq", ".csv")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# A CSV row with a longer cell is skipped (as a bad row), not read.
CSV_CELL_LIMIT = 16 * 2**20


class DataError(ValueError):
    """One-line, user-facing: names the file, line/record and field."""


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred (chosen) and a dispreferred (rejected) continuation."""

    prompt: str | list[Message]
    chosen: str | list[Message]
    rejected: str | list[Message]
    source: str
    format: str

    @property
    def is_conversational(self) -> bool:
        """True when prompt/chosen/rejected are message lists (rendered by a chat template)."""
        return not isinstance(self.prompt, str)


@dataclass
class SkipReport:
    """Rows skipped while reading, per reason, with the first few source locations."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    total_read: int = 0
    kept: int = 0

    MAX_EXAMPLES: ClassVar[int] = 5
    _SUMMARY_EXAMPLES: ClassVar[int] = 3

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, source: str) -> None:
        """Count one skipped row."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.MAX_EXAMPLES:
            examples.append(source)

    def summary(self) -> str:
        """Short human text, e.g. ``skipped 3 of 2354 rows: identical responses 2 (f:17, f:40)``."""
        if not self.counts:
            return f"kept all {self.total_read} rows"
        parts = []
        for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            shown = self.examples.get(reason, [])[: self._SUMMARY_EXAMPLES]
            more = ", ..." if n > len(shown) else ""
            parts.append(f"{reason} {n} ({', '.join(shown)}{more})")
        return f"skipped {self.skipped} of {self.total_read} rows: " + "; ".join(parts)

    def short(self, where: str) -> str:
        """One line of counts per reason, the locations left to ``where``, e.g. ``skipped 3
        of 2354 rows: identical responses 2, empty response 1 (rows: data_report.json)``."""
        counts = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return (f"skipped {self.skipped} of {self.total_read} rows: "
                + ", ".join(f"{reason} {n}" for reason, n in counts) + f" (rows: {where})")

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {
            "total_read": self.total_read,
            "kept": self.kept,
            "skipped": self.skipped,
            "counts": dict(self.counts),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }

    def write(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as a JSON file."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


class RowSkip(Exception):
    """A row-level problem: ``reason`` is the counted key, ``detail`` extra text for strict mode."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


_Skip = RowSkip


# ---------------------------------------------------------------------------------------------
# Record sources: each yields (location, record) with 1-based locations.


def _open_source(
    source: str | os.PathLike | Iterable[Any],
) -> tuple[str, Iterator[tuple[str, Any]]]:
    if not isinstance(source, str | bytes | os.PathLike):  # rows given in memory (Python API)
        return "dataset", ((f"dataset[{i}]", row) for i, row in enumerate(source))
    name = os.fsdecode(os.fspath(source))
    path = Path(name)
    if path.is_dir():
        raise DataError(f"{name}: is a directory, expected a data file")
    if path.exists():
        if not path.is_file():  # reading a FIFO or a device would block or never end
            raise DataError(f"{name}: not a regular file (a FIFO, socket or device?); expected "
                            "a data file")
        return name, _file_records(path, name)
    if isinstance(source, str) and _looks_like_hub_id(name):
        return name, _hub_records(name)
    raise DataError(f"{name}: no such file")


def _looks_like_hub_id(name: str) -> bool:
    repo, _, split = name.partition(":")
    if not _HUB_ID.fullmatch(repo) or repo.lower().endswith(_FILE_SUFFIXES):
        return False
    return not split or not any(c in split for c in "/\\")


def _file_records(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    suffixes = [s.lower() for s in path.suffixes]
    compressed = bool(suffixes) and suffixes[-1] == ".gz"
    if compressed:
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind in (".parquet", ".pq") and not compressed:
        return _parquet_records(path, name)
    if kind == ".csv":
        return _csv_records(_read_text(path, name, compressed), name)
    if kind in _LINE_SUFFIXES or (compressed and kind != ".json"):
        return _jsonl_records(_byte_lines(path, name, compressed), name)
    if kind == ".json":
        return _json_records(_read_text(path, name, compressed), name)
    raise DataError(
        f"{name}: unsupported file type {path.suffix or '(no suffix)'!r}; "
        "expected .jsonl, .json, .gz, .parquet or .csv"
    )


def _read_bytes(path: Path, name: str, compressed: bool) -> bytes:
    try:
        if compressed:
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{name}: cannot read ({e})") from None


def _read_text(path: Path, name: str, compressed: bool) -> str:
    data = _read_bytes(path, name, compressed)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{name}:{line}: invalid UTF-8 (byte 0x{data[e.start]:02x})") from None
    return text.removeprefix("\ufeff")


def _byte_lines(path: Path, name: str, compressed: bool) -> Iterator[tuple[int, str]]:
    """Decoded lines of a JSON-lines file, streamed; bad UTF-8 is reported with its line."""
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{name}:{lineno}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                        f"{e.start + 1} of the line)"
                    ) from None
                yield lineno, text.removeprefix("\ufeff") if lineno == 1 else text
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{name}: cannot read ({e})") from None


def _loads(text: str, where: str) -> Any:
    """json.loads with every failure as a one-line DataError about ``where``."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise _json_failure(where, e) from None


def _json_failure(where: str, error: Exception) -> DataError:
    return DataError(f"{where}: {json_problem(error)}")


def _jsonl_records(lines: Iterable[tuple[int, str]], name: str) -> Iterator[tuple[str, Any]]:
    for lineno, text in lines:
        if not text.strip():
            continue
        yield f"{name}:{lineno}", _loads(text, f"{name}:{lineno}")


def _json_records(text: str, name: str) -> Iterator[tuple[str, Any]]:
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            # More than one top-level value: JSON lines stored under a .json name. Split on
            # "\n" only: str.splitlines would also break at U+2028 inside strings.
            yield from _jsonl_records(enumerate(text.split("\n"), 1), name)
            return
        raise DataError(f"{name}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise _json_failure(name, e) from None
    if isinstance(data, dict):
        for key in ("data", "train"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            data = [data]  # a single object on its own
    if not isinstance(data, list):
        raise DataError(
            f"{name}: top-level JSON value is {_a_type(data)}, expected a list of objects"
        )
    for i, record in enumerate(data, 1):
        yield f"{name}:{i}", record


def _csv_records(text: str, name: str) -> Iterator[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    # csv's own cell limit (128 KiB by default) would reject the whole file at the first longer
    # cell; no cell is longer than the text, and rows are held to CSV_CELL_LIMIT here instead.
    previous = csv.field_size_limit()
    csv.field_size_limit(max(previous, min(len(text) + 1, 2**31 - 1)))
    try:
        for i, row in enumerate(reader, 1):
            row.pop(None, None)  # cells beyond the header
            long = [k for k, v in row.items() if isinstance(v, str) and len(v) > CSV_CELL_LIMIT]
            if long:
                yield f"{name}:{i}", _Skip("cell too long", f"field '{_clip(long[0], 40)}' "
                                           f"has more than {CSV_CELL_LIMIT} characters")
                continue
            yield f"{name}:{i}", row
    except csv.Error as e:
        raise DataError(f"{name}:{reader.line_num}: invalid CSV ({e})") from None
    finally:
        csv.field_size_limit(previous)


def _parquet_records(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{name}: not a readable Parquet file ({e})") from None
    index = 0
    batches = parquet.iter_batches(batch_size=1024)
    while True:
        try:  # a damaged data page shows only when its batch is decoded
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{name}: damaged Parquet data after row {index} "
                            f"({_first_line(e)})") from None
        if batch is None:
            return
        for row in batch.to_pylist():
            index += 1
            yield f"{name}:{index}", row


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Switch the hub client and ``datasets`` to offline mode, as HF_HUB_OFFLINE=1 at start-up
    would (both read it once, at import): a cached dataset still loads, anything else fails at
    once instead of after ~30 s of retries."""
    import datasets
    import huggingface_hub

    saved = huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _hub_records(spec: str) -> Iterator[tuple[str, Any]]:
    from ..models import hub_reachable

    repo, _, split = spec.partition(":")
    split = split or "train"
    offline = not hub_reachable()
    try:
        import datasets

        with _hub_offline() if offline else contextlib.nullcontext():
            dataset = datasets.load_dataset(repo, split=split)
    except Exception as e:  # offline, unknown repo, bad split...: datasets raises many types
        if offline:
            raise DataError(
                f"{spec}: not a local file nor in the Hugging Face datasets cache, and the Hub "
                "cannot be reached (offline); pass a local JSONL, JSON, Parquet or CSV file"
            ) from None
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(
            f"{spec}: not a local file, and loading Hugging Face Hub dataset {repo!r} "
            f"split {split!r} failed ({type(e).__name__}: {first})"
        ) from None
    for i, record in enumerate(dataset, 1):
        yield f"{repo}[{split}]:{i}", record


# ---------------------------------------------------------------------------------------------
# Detection.


def _first_line(error: BaseException, limit: int = 200) -> str:
    return _clip((str(error).strip().splitlines() or [type(error).__name__])[0], limit)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 80


def _short(value: Any) -> str:
    """A repr of a value quoted in a message, bounded in length and depth."""
    return _SHORT_REPR.repr(value)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _a_type(value: Any) -> str:
    """``'an int'``, ``'a list'``, ``'null'``: the type name with its article, for messages."""
    name = _type_name(value)
    return name if value is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def detect_format(record: Mapping[str, Any]) -> str | None:
    """The format name a record's fields match, or None."""
    keys = set(record)
    if {"history", "human_ref_A", "human_ref_B"} <= keys:
        return "shp"
    if {"question", "response_j", "response_k"} <= keys:
        return "stack-exchange-paired"
    if not {"chosen", "rejected"} <= keys:
        return None
    chosen, rejected = record["chosen"], record["rejected"]
    if "conversations" in keys:
        return "conversational"
    if "prompt" in keys:
        values = (record["prompt"], chosen, rejected)
        if all(isinstance(v, str) for v in values):
            return "explicit"
        if all(isinstance(v, list) for v in values):
            return "conversational"
        return None
    if isinstance(chosen, list) and isinstance(rejected, list):
        return "conversational"
    if isinstance(chosen, str) and isinstance(rejected, str):
        return "hh" if HH_ASSISTANT in chosen else "implicit"
    return None


def _undetected(location: str, record: Mapping[str, Any]) -> DataError:
    fields = [f"{_clip(str(k), 60)} ({_type_name(v)})" for k, v in list(record.items())[:20]]
    found = ", ".join(fields + ["..."] * (len(record) > 20)) or "none"
    known = "; ".join(f"{k}: {v}" for k, v in _FORMAT_FIELDS.items())
    texts = [str(k) for k, v in record.items() if isinstance(v, str)][:3]
    example = (" (here perhaps " + " ".join(f"{key}={_clip(name, 40)}" for key, name in
                                           zip(("prompt_field", "chosen_field", "rejected_field"),
                                               texts, strict=True)) + ")"
               if len(texts) == 3 else "")
    return DataError(
        f"{location}: cannot detect the data format; fields found: {found}; known formats: "
        f"{known}; name your fields with prompt_field=, chosen_field=, rejected_field= (a "
        f"message list: messages_field=){example}; choose one with dataset_format= (format= "
        "in read_pairs)"
    )


def rename_fields(record: Mapping[str, Any], fields: Mapping[str, str]) -> Mapping[str, Any]:
    """``record`` with its fields renamed to the names a format reads: ``fields`` maps
    ``{"prompt": "question", ...}``. A mapped field the record lacks is left missing (the row
    is then skipped, or the format not detected); same-named fields it shadows are dropped."""
    sources = set(fields.values())
    out = {k: v for k, v in record.items() if k not in sources and k not in fields}
    for name, source in fields.items():
        if source in record:
            out[name] = record[source]
    return out


# ---------------------------------------------------------------------------------------------
# Row parsers: record -> PreferencePair, or raise _Skip.


def _get(record: Mapping[str, Any], key: str) -> Any:
    value = record.get(key)
    if value is None:  # Parquet/CSV/datasets give None for a missing cell
        raise _Skip(f"missing field '{key}'")
    return value


def _get_str(record: Mapping[str, Any], key: str) -> str:
    value = _get(record, key)
    if not isinstance(value, str):
        raise _Skip(f"field '{key}' is not a string", f"got {_type_name(value)}")
    return value


def _get_number(record: Mapping[str, Any], key: str) -> float:
    value = _get(record, key)
    if isinstance(value, str):  # CSV cells are text
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise _Skip(f"field '{key}' is not a number", f"got {_short(value)}")
    return float(value)


def _is_empty(response: str | list[Message]) -> bool:
    if isinstance(response, str):
        return not response.strip()
    return all(not m["content"].strip() for m in response)


def _finish(
    prompt: str | list[Message],
    chosen: str | list[Message],
    rejected: str | list[Message],
    location: str,
    fmt: str,
) -> PreferencePair:
    empty = [name for name, r in (("chosen", chosen), ("rejected", rejected)) if _is_empty(r)]
    if empty:
        raise _Skip("empty response", f"{' and '.join(empty)} response is empty")
    if chosen == rejected:
        raise _Skip("identical responses")
    return PreferencePair(prompt, chosen, rejected, location, fmt)


def _parse_hh(record: Mapping[str, Any], location: str, _: float) -> PreferencePair:
    chosen = _get_str(record, "chosen")
    rejected = _get_str(record, "rejected")
    cut = chosen.rfind(HH_ASSISTANT)
    if cut < 0:
        raise _Skip("no assistant turn", "the chosen transcript has no '\\n\\nAssistant:' turn")
    prompt = chosen[: cut + len(HH_ASSISTANT)]
    if not rejected.startswith(prompt):
        raise _Skip(
            "prompt mismatch",
            "the rejected transcript does not start with the chosen transcript's prompt, "
            "which is everything up to its last '\\n\\nAssistant:'",
        )
    return _finish(prompt, chosen[len(prompt) :], rejected[len(prompt) :], location, "hh")


def _hh_prompt(text: str) -> str:
    return f"{HH_HUMAN} {text}{HH_ASSISTANT}"


def _parse_shp(record: Mapping[str, Any], location: str, min_ratio: float) -> PreferencePair:
    history = _get_str(record, "history")
    ref_a = _get_str(record, "human_ref_A")
    ref_b = _get_str(record, "human_ref_B")
    label = _get_number(record, "labels")
    if label not in (0.0, 1.0):
        raise _Skip("field 'labels' is not 0 or 1", f"got {_short(record['labels'])}")
    score_a = _get_number(record, "score_A")
    score_b = _get_number(record, "score_B")
    chosen, rejected = (ref_a, ref_b) if label == 1.0 else (ref_b, ref_a)
    pair = _finish(_hh_prompt(history), " " + chosen, " " + rejected, location, "shp")
    high, low = max(score_a, score_b), min(score_a, score_b)
    # Non-positive scores: any difference counts as an infinite ratio, equal scores as 1.
    ratio = high / low if low > 0 else (math.inf if high > low else 1.0)
    if ratio < min_ratio:
        raise _Skip("low score ratio", f"score ratio {ratio:.3g} < {min_ratio:g}")
    return pair


def _parse_stack_exchange(record: Mapping[str, Any], location: str, _: float) -> PreferencePair:
    question = _get_str(record, "question")
    better = _get_str(record, "response_j")
    worse = _get_str(record, "response_k")
    return _finish(
        _hh_prompt(question), " " + better, " " + worse, location, "stack-exchange-paired"
    )


def _parse_explicit(record: Mapping[str, Any], location: str, _: float) -> PreferencePair:
    prompt = _get_str(record, "prompt")
    chosen = _get_str(record, "chosen")
    rejected = _get_str(record, "rejected")
    return _finish(prompt, chosen, rejected, location, "explicit")


def split_shared_prompt(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Split two full texts into (prompt, chosen response, rejected response).

    The prompt is the longest common prefix cut back to a turn boundary: right after the last
    ``"Assistant:"`` in it if there is one, else just before its last run of whitespace (so the
    responses start with that whitespace, like HH responses start with a space). None when no
    non-blank prompt remains.
    """
    common = os.path.commonprefix([chosen, rejected])
    marker = common.rfind(_TURN_MARKER)
    if marker >= 0:
        cut = marker + len(_TURN_MARKER)
    else:
        runs = list(re.finditer(r"\s+", common))
        cut = runs[-1].start() if runs else 0
    prompt = common[:cut]
    if not prompt.strip():
        return None
    return prompt, chosen[cut:], rejected[cut:]


def _parse_implicit(record: Mapping[str, Any], location: str, _: float) -> PreferencePair:
    chosen = _get_str(record, "chosen")
    rejected = _get_str(record, "rejected")
    if chosen == rejected:
        raise _Skip("identical responses")
    split = split_shared_prompt(chosen, rejected)
    if split is None:
        raise _Skip("no shared prompt", "chosen and rejected share no prompt text")
    return _finish(*split, location, "implicit")


def _message(value: Any, field_name: str) -> Message:
    if isinstance(value, Mapping):
        if isinstance(value.get("role"), str) and isinstance(value.get("content"), str):
            role = _SHAREGPT_ROLES.get(value["role"], value["role"])
            return {"role": role, "content": value["content"]}
        if isinstance(value.get("from"), str) and isinstance(value.get("value"), str):
            role = _SHAREGPT_ROLES.get(value["from"])
            if role is None:
                raise _Skip(f"unknown role '{_clip(value['from'], 40)}' in field "
                            f"'{field_name}'")
            return {"role": role, "content": value["value"]}
    raise _Skip(f"field '{field_name}' is not a message list", f"got {_short(value)}")


def _messages(record: Mapping[str, Any], key: str) -> list[Message]:
    value = _get(record, key)
    if not isinstance(value, list):
        raise _Skip(f"field '{key}' is not a message list", f"got {_type_name(value)}")
    return [_message(m, key) for m in value]


def _parse_conversational(record: Mapping[str, Any], location: str, _: float) -> PreferencePair:
    if "conversations" in record:  # ShareGPT / LLaMA-Factory
        prompt = _messages(record, "conversations")
        system = record.get("system")
        if isinstance(system, str) and system and not (prompt and prompt[0]["role"] == "system"):
            prompt.insert(0, {"role": "system", "content": system})
        chosen = [_message(_get(record, "chosen"), "chosen")]
        rejected = [_message(_get(record, "rejected"), "rejected")]
    elif "prompt" in record and record["prompt"] is not None:
        prompt = _messages(record, "prompt")
        chosen = _messages(record, "chosen")
        rejected = _messages(record, "rejected")
        n = len(prompt)
        full = [r[:n] == prompt and len(r) >= n for r in (chosen, rejected)]
        if n and all(full):  # full conversations that repeat the prompt: split it off
            chosen, rejected = chosen[n:], rejected[n:]
        elif n and any(full):
            raise _Skip(
                "prompt mismatch",
                "only one of chosen/rejected is a full conversation starting with the prompt",
            )
    else:  # implicit prompt: the shared leading messages
        chosen = _messages(record, "chosen")
        rejected = _messages(record, "rejected")
        if chosen == rejected:
            raise _Skip("identical responses")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise _Skip("no shared prompt", "chosen and rejected share no leading messages")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if not prompt:
        raise _Skip("empty prompt")
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if response and response[0]["role"] != "assistant":
            raise _Skip(
                "response is not an assistant message",
                f"{name} starts with a '{response[0]['role']}' message",
            )
    return _finish(prompt, chosen, rejected, location, "conversational")


_PARSERS: dict[str, Callable[[Mapping[str, Any], str, float], PreferencePair]] = {
    "hh": _parse_hh,
    "shp": _parse_shp,
    "stack-exchange-paired": _parse_stack_exchange,
    "explicit": _parse_explicit,
    "implicit": _parse_implicit,
    "conversational": _parse_conversational,
}


# ---------------------------------------------------------------------------------------------
# Public entry points.


Prompt = str | list[Message]


def read_prompt_rows(source: str | os.PathLike | Iterable[Any]) -> list[Prompt] | None:
    """The prompts of a prompt-only source (records with a ``prompt``, text or a message
    list, and neither ``chosen`` nor ``rejected``: what ``preftune eval`` and ``pairs`` sample
    from), in order; None when the first record is a preference pair. An unusable prompt is
    a one-line DataError naming its record."""
    name, records = _open_source(source)
    first = next(records, None)
    if first is None:
        raise DataError(f"{name}: no records (empty file)")
    record = first[1]
    if not (isinstance(record, Mapping) and "prompt" in record
            and not {"chosen", "rejected"} & set(record)):
        return None
    prompts: list[Prompt] = []
    for location, record in [first, *records]:
        value = record.get("prompt") if isinstance(record, Mapping) else None
        try:
            if isinstance(value, list):
                value = _messages(record, "prompt")
        except RowSkip:
            value = None
        if not (isinstance(value, str) and value.strip() or isinstance(value, list) and value):
            raise DataError(f"{location}: prompt: expected text or a list of messages")
        prompts.append(value)
    return prompts


def read_pairs(
    source: str | os.PathLike,
    format: str | None = None,
    *,
    strict: bool = False,
    report: SkipReport | None = None,
    min_score_ratio: float = 2.0,
    quiet: bool = False,
    check: Callable[[PreferencePair], None] | None = None,
    fields: Mapping[str, str] | None = None,
) -> Iterator[PreferencePair]:
    """Stream preference pairs from ``source``.

    ``source`` is a local file (JSON lines, gzipped JSON lines, JSON list or {"data"/"train":
    [...]}, Parquet, CSV) or, when no such path exists, a Hub dataset ``"owner/name[:split]"``
    (default split "train") loaded with :func:`datasets.load_dataset`. ``format`` overrides
    detection. Row-level problems are skipped and counted in ``report`` (or raise
    :class:`DataError` with ``strict=True``); ``min_score_ratio`` filters SHP pairs. Once
    iteration ends, a summary of skipped rows goes to stderr unless ``quiet``. ``check``, if
    given, sees each pair read and may reject it as a bad row by raising :class:`RowSkip`
    (e.g. :func:`preftune.data.tokenize.chat_template_check`). ``fields`` reads other field
    names as a format's own (:func:`rename_fields`: ``{"prompt": "question", "chosen": "good",
    "rejected": "bad"}``). ``source`` may also be rows in memory: a list of dicts or a
    ``datasets.Dataset`` (locations ``dataset[i]``, from 0).

    Problems with the file itself (missing, unreadable, empty, bad JSON or UTF-8, or every row
    skipped: "no usable pairs in FILE: <summary>") raise :class:`DataError`; a missing path or
    unknown ``format`` does so at call time.
    """
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown format {format!r}; known formats: {', '.join(FORMATS)}")
    name, records = _open_source(source)
    return _iter_pairs(
        name,
        records,
        format,
        strict=strict,
        report=report if report is not None else SkipReport(),
        min_score_ratio=min_score_ratio,
        quiet=quiet,
        check=check,
        fields=fields,
    )


def _iter_pairs(
    name: str,
    records: Iterator[tuple[str, Any]],
    fmt: str | None,
    *,
    strict: bool,
    report: SkipReport,
    min_score_ratio: float,
    quiet: bool,
    check: Callable[[PreferencePair], None] | None = None,
    fields: Mapping[str, str] | None = None,
) -> Iterator[PreferencePair]:
    skipped_before, kept_before = report.skipped, report.kept
    seen = 0
    for location, record in records:
        seen += 1
        if fields and isinstance(record, Mapping):
            record = rename_fields(record, fields)
        if fmt is None and not isinstance(record, _Skip):
            if not isinstance(record, Mapping):
                raise DataError(
                    f"{location}: record is {_a_type(record)}, expected an object with fields"
                )
            fmt = detect_format(record)
            if fmt is None:
                raise _undetected(location, record)
        report.total_read += 1
        try:
            if isinstance(record, _Skip):  # the reader found the row unusable (_csv_records)
                raise record
            if not isinstance(record, Mapping):
                raise _Skip("record is not an object", f"got {_type_name(record)}")
            pair = _PARSERS[fmt](record, location, min_score_ratio)  # type: ignore[index]
            if check is not None:
                check(pair)
        except _Skip as skip:
            if strict:
                detail = f" ({skip.detail})" if skip.detail else ""
                raise DataError(f"{location}: {skip.reason}{detail}") from None
            report.add(skip.reason, location)
            continue
        report.kept += 1
        yield pair
    if seen == 0:
        raise DataError(f"{name}: no records (empty file)")
    if report.kept == kept_before:
        # Every row was skipped: a file-level problem (often the wrong format), not a row's.
        raise DataError(f"no usable pairs in {name}: {report.summary()}")
    if not quiet and report.skipped > skipped_before:
        print(report.summary(), file=sys.stderr)


def load_pairs(
    source: str | os.PathLike,
    format: str | None = None,
    *,
    strict: bool = False,
    min_score_ratio: float = 2.0,
    quiet: bool = False,
    check: Callable[[PreferencePair], None] | None = None,
    fields: Mapping[str, str] | None = None,
) -> tuple[list[PreferencePair], SkipReport]:
    """All pairs of ``source`` and the report of skipped rows (see :func:`read_pairs`)."""
    report = SkipReport()
    pairs = list(
        read_pairs(
            source,
            format,
            strict=strict,
            report=report,
            min_score_ratio=min_score_ratio,
            quiet=quiet,
            check=check,
            fields=fields,
        )
    )
    return pairs, report
