"""``preftune data inspect|convert``: look at a preference dataset, or rewrite it as JSON lines.

``inspect`` shows a few pairs with their prompt / chosen / rejected boundaries and, with a
tokenizer, what training would cut from them; then statistics of the whole file (rows read,
pairs kept, skipped rows per reason, duplicates, length percentiles, truncation rates).
``convert`` writes any supported format as explicit ``{"prompt", "chosen", "rejected"}`` JSON
lines that :func:`preftune.data.read_pairs` reads back to the same pairs.

Tokenization and truncation are those of training (:mod:`preftune.data.tokenize`), and the
length defaults are those of the training config. This module does not import torch itself;
``transformers`` is only loaded when a tokenizer is given.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import json
import math
import os
import random
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from preftune.config import TrainConfig, one_line
from preftune.data.formats import FORMATS, DataError, PreferencePair, SkipReport, read_pairs

# The private helpers are the ones tokenize_pair itself runs, so that what inspect shows as
# cut is exactly what training cuts (tokenize_pair only returns the ids after truncation).
from preftune.data.tokenize import (
    _distinct_bos,
    _tokenize_parts,
    _truncate,
    bos_head,
    render_chat,
    resolve_truncation,
)
from preftune.io import atomic_write

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
MAX_LENGTH: int = _CONFIG_DEFAULTS["max_length"]
MAX_PROMPT_LENGTH: int = _CONFIG_DEFAULTS["max_prompt_length"]
TRUNCATION: str = _CONFIG_DEFAULTS["truncation"]
TRUNCATIONS = ("auto", "keep_end", "keep_start")

PERCENTILES = (50, 90, 99)
LENGTH_KEYS = ("prompt", "chosen", "rejected", "total")
MAX_DUPLICATE_EXAMPLES = 3
OUTPUT_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")

DATASET_HELP = ("local file (jsonl, jsonl.gz, json, parquet, csv) or Hugging Face Hub dataset "
                "owner/name[:split]")
FORMAT_HELP = "row format (default: detected from the first record)"

DATA_DESCRIPTION = "Look at a preference dataset before training on it, or rewrite it."
DATA_EPILOG = """\
Formats: hh, shp, stack-exchange-paired, explicit, implicit, conversational (see
preftune.data.formats); files: .jsonl, .jsonl.gz, .json, .parquet, .csv, or a Hub dataset.
Run 'preftune data COMMAND --help' for the options of a command."""

INSPECT_EPILOG = f"""\
Without --tokenizer, lengths are in characters (of the message contents, for conversational
pairs) and nothing is truncated. With it, pairs are tokenized exactly as training does:
prompt lengths include a BOS token where the tokenizer adds one, response lengths include
the EOS appended to every response, conversational pairs are rendered with the chat
template, and "total" is the prompt plus the longer response.

Truncation as in training: when prompt + longer response exceeds --max-length, the prompt
is cut to --max-prompt-length tokens (keep_end drops its start, keep_start its end), then
responses to max-length - max-prompt-length tokens if still too long. The defaults are
those of the training config: --max-length {MAX_LENGTH}, --max-prompt-length {MAX_PROMPT_LENGTH},
--truncation {TRUNCATION} (keep_end for hh and chat messages, keep_start otherwise).

Pairs are drawn at random (--seed) and shown in file order. "duplicate pairs" counts pairs
equal to an earlier one in prompt, chosen and rejected; "repeated prompts" counts pairs
whose prompt an earlier pair already had. Exit status: 0, or 2 on bad input."""

CONVERT_EPILOG = """\
Text pairs are written as {"prompt": str, "chosen": str, "rejected": str}. Conversational
pairs are written as message lists, {"prompt": [...], "chosen": [...], "rejected": [...]}
with {"role", "content"} messages (ShareGPT from/value roles become user/assistant/system),
so reading the file back gives the same pairs. With --tokenizer, conversational pairs are
instead rendered to text with its chat template, as training renders them: the prompt with
the generation prompt, each response the rest of the rendering (e.g. Qwen's "<|im_end|>"
included); text pairs are written unchanged. Training on rendered text is not token-
identical to training on messages (an EOS is always appended to text responses).

The file is written to a temporary name next to OUTPUT and renamed when complete, so a
failed conversion leaves nothing behind; an existing OUTPUT is kept unless --force. OUTPUT
must end with .jsonl or .jsonl.gz (gzip). Skipped rows are summarised on stderr, as in
training.

Note: the converted file reads as format "explicit" (or "conversational"), whose automatic
truncation is keep_start; hh data is truncated keep_end by default, so train converted hh
data with truncation=keep_end to cut prompts as before."""


class CommandError(Exception):
    """A one-line, user-facing problem (exit status 2)."""


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line and returns instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CommandError(f"{message} (see '{self.prog} --help')")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        if message:
            print(message, file=sys.stderr, end="")
        raise _Exit(status)


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``preftune data`` parser with its ``inspect`` and ``convert`` subcommands."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="preftune data", description=DATA_DESCRIPTION, epilog=DATA_EPILOG,
                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", title="commands", metavar="{inspect,convert}")

    inspect = sub.add_parser(
        "inspect", prog="preftune data inspect", formatter_class=fmt, epilog=INSPECT_EPILOG,
        help="show a few pairs (and with --tokenizer what training cuts), then statistics: "
        "skipped rows, duplicates, lengths, truncation rates",
        description="Show a few pairs of DATASET, then statistics of the whole file.")
    inspect.add_argument("dataset", metavar="DATASET", help=DATASET_HELP)
    inspect.add_argument("--tokenizer", metavar="T",
                         help="tokenizer folder, model alias or Hub id: token lengths and "
                         "truncation as in training (default: character lengths)")
    inspect.add_argument("--format", choices=FORMATS, metavar="F",
                         help=f"{FORMAT_HELP}; one of {', '.join(FORMATS)}")
    inspect.add_argument("--n", type=_count(0), default=3, metavar="N",
                         help="pairs to show (default: 3; 0 = statistics only)")
    inspect.add_argument("--max-length", type=_count(1), default=MAX_LENGTH, metavar="L",
                         help=f"max tokens of prompt + response (default: {MAX_LENGTH})")
    inspect.add_argument("--max-prompt-length", type=_count(1), default=MAX_PROMPT_LENGTH,
                         metavar="P", help=f"max prompt tokens when cutting, < L (default: "
                         f"{MAX_PROMPT_LENGTH})")
    inspect.add_argument("--truncation", choices=TRUNCATIONS, default=TRUNCATION,
                         help=f"which end of a long prompt to keep (default: {TRUNCATION} = "
                         "keep_end for hh, keep_start otherwise)")
    inspect.add_argument("--seed", type=_count(0), default=0, metavar="S",
                         help="random seed for the pairs shown (default: 0)")
    inspect.add_argument("--json", action="store_true",
                         help="print only the statistics, as one JSON object")
    inspect.add_argument("--strict", action="store_true",
                         help="stop at the first bad row instead of skipping and counting it")
    _field_options(inspect)
    inspect.set_defaults(run=run_inspect)

    convert = sub.add_parser(
        "convert", prog="preftune data convert", formatter_class=fmt, epilog=CONVERT_EPILOG,
        help="rewrite as explicit prompt/chosen/rejected JSON lines",
        description="Write the pairs of DATASET to OUTPUT as explicit prompt/chosen/rejected "
        "JSON lines.")
    convert.add_argument("dataset", metavar="DATASET", help=DATASET_HELP)
    convert.add_argument("output", metavar="OUTPUT.jsonl", help="file to write (.jsonl or "
                         ".jsonl.gz)")
    convert.add_argument("--format", choices=FORMATS, metavar="F",
                         help=f"{FORMAT_HELP}; one of {', '.join(FORMATS)}")
    convert.add_argument("--tokenizer", metavar="T",
                         help="render conversational pairs to text with this tokenizer's "
                         "chat template (default: keep them as message lists)")
    convert.add_argument("--force", action="store_true", help="overwrite an existing OUTPUT")
    convert.add_argument("--strict", action="store_true",
                         help="stop at the first bad row instead of skipping and counting it")
    _field_options(convert)
    convert.set_defaults(run=run_convert)
    return parser


# --NAME-field options: the training keys NAME_field=, for fields named otherwise.
FIELD_OPTIONS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected",
                 "messages": "conversations"}


def _field_options(parser: argparse.ArgumentParser) -> None:
    for option, name in FIELD_OPTIONS.items():
        parser.add_argument(f"--{option}-field", metavar="FIELD",
                            help=f"read FIELD as '{name}' (as {option}_field= in training)")


def _field_map(args: argparse.Namespace) -> dict[str, str]:
    return {name: getattr(args, f"{option}_field") for option, name in FIELD_OPTIONS.items()
            if getattr(args, f"{option}_field", None) is not None}


def main(argv: Sequence[str] | None = None) -> int:
    """``preftune data ...`` (argv is what follows ``data``); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    parser = build_parser()
    try:
        options = parser.parse_args(args)
        if options.command is None:
            parser.print_help(sys.stderr)
            return 2
        return options.run(options)
    except _Exit as e:
        return e.status
    except (CommandError, DataError) as e:
        if debug:
            raise
        print(f"preftune: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `preftune data inspect ... | head`
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0


# ---------------------------------------------------------------------------------------------
# Shared helpers.


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer training would use for ``tokenizer=name``; errors become CommandError."""
    from preftune.models import ModelError
    from preftune.models import load_tokenizer as load

    try:
        return load(name)
    except ModelError as e:
        raise CommandError(str(e)) from None


def _open_pairs(
    args: argparse.Namespace, report: SkipReport, quiet: bool
) -> Iterator[PreferencePair]:
    """read_pairs; a missing file or bad format is reported here, before any tokenizer loads."""
    return read_pairs(args.dataset, args.format, strict=args.strict, report=report, quiet=quiet,
                      fields=_field_map(args))


# ---------------------------------------------------------------------------------------------
# inspect


@dataclass
class _Cut:
    """One pair tokenized as training does, before and after truncation."""

    prompt: list[int]
    responses: list[list[int]]  # chosen, rejected
    kept_prompt: list[int]
    kept_responses: list[list[int]]
    head: int  # prompt tokens kept in front of the cut (keep_end: a leading BOS; keep_start: all)
    mode: str  # the truncation mode it was cut with

    @property
    def prompt_cut(self) -> int:
        return len(self.prompt) - len(self.kept_prompt)

    def response_cut(self, i: int) -> int:
        return len(self.responses[i]) - len(self.kept_responses[i])


def _cut_pair(
    pair: PreferencePair,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int,
    mode: str,
) -> _Cut:
    prompt, responses = _tokenize_parts(pair, tokenizer, ("chosen", "rejected"))
    bos = _distinct_bos(tokenizer)
    kept_prompt, kept_responses = _truncate(
        prompt, responses, max_length=max_length, max_prompt_length=max_prompt_length,
        truncation=mode, bos=bos,  # type: ignore[arg-type]
    )
    head = len(kept_prompt) if mode == "keep_start" else bos_head(prompt, bos)
    return _Cut(prompt, responses, kept_prompt, kept_responses, head, mode)


def _chars(value: str | list[dict[str, str]]) -> int:
    if isinstance(value, str):
        return len(value)
    return sum(len(m["content"]) for m in value)


def _key(value: str | list[dict[str, str]]) -> str:
    if isinstance(value, str):
        return "s" + value
    return "m" + json.dumps(value, ensure_ascii=False, sort_keys=True)


def percentiles(values: Iterable[int]) -> dict[str, int]:
    """Nearest-rank p50/p90/p99 and max of ``values`` (all 0 when empty)."""
    ordered = sorted(values)
    if not ordered:
        return {**{f"p{p}": 0 for p in PERCENTILES}, "max": 0}
    out = {f"p{p}": ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1] for p in PERCENTILES}
    out["max"] = ordered[-1]
    return out


@dataclass
class _Stats:
    lengths: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in LENGTH_KEYS})
    seen_pairs: dict[tuple[str, str, str], str] = field(default_factory=dict)
    seen_prompts: dict[str, str] = field(default_factory=dict)
    duplicate_pairs: int = 0
    duplicate_prompts: int = 0
    duplicate_examples: list[tuple[str, str]] = field(default_factory=list)
    prompt_examples: list[tuple[str, str]] = field(default_factory=list)
    prompts_cut: int = 0
    responses_cut: int = 0
    modes: dict[str, int] = field(default_factory=dict)

    def add_duplicates(self, pair: PreferencePair) -> None:
        prompt = _key(pair.prompt)
        whole = (prompt, _key(pair.chosen), _key(pair.rejected))
        first = self.seen_pairs.setdefault(whole, pair.source)
        if first != pair.source:
            self.duplicate_pairs += 1
            if len(self.duplicate_examples) < MAX_DUPLICATE_EXAMPLES:
                self.duplicate_examples.append((pair.source, first))
        first = self.seen_prompts.setdefault(prompt, pair.source)
        if first != pair.source:
            self.duplicate_prompts += 1
            if len(self.prompt_examples) < MAX_DUPLICATE_EXAMPLES:
                self.prompt_examples.append((pair.source, first))

    def add_lengths(self, prompt: int, chosen: int, rejected: int) -> None:
        for key, n in zip(LENGTH_KEYS, (prompt, chosen, rejected, prompt + max(chosen, rejected)),
                          strict=True):
            self.lengths[key].append(n)


def run_inspect(args: argparse.Namespace) -> int:
    out = sys.stdout
    if args.max_prompt_length >= args.max_length:
        raise CommandError(f"--max-prompt-length ({args.max_prompt_length}) must be less than "
                           f"--max-length ({args.max_length})")
    report = SkipReport()
    reader = _open_pairs(args, report, quiet=True)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    pairs = list(reader)

    rng = random.Random(args.seed)
    shown = sorted(rng.sample(range(len(pairs)), min(args.n, len(pairs)))) if not args.json else []
    shown_set = set(shown)
    cuts: dict[int, _Cut] = {}
    stats = _Stats()
    for i, pair in enumerate(pairs):
        stats.add_duplicates(pair)
        if tokenizer is None:
            stats.add_lengths(_chars(pair.prompt), _chars(pair.chosen), _chars(pair.rejected))
            continue
        mode = resolve_truncation(args.truncation, pair.format)
        stats.modes[mode] = stats.modes.get(mode, 0) + 1
        cut = _cut_pair(pair, tokenizer, args.max_length, args.max_prompt_length, mode)
        stats.add_lengths(len(cut.prompt), *(len(r) for r in cut.responses))
        stats.prompts_cut += cut.prompt_cut > 0
        stats.responses_cut += cut.response_cut(0) > 0 or cut.response_cut(1) > 0
        if i in shown_set:
            cuts[i] = cut

    summary = _summary(args, pairs, report, stats, tokenizer)
    if args.json:
        print(json.dumps(summary, ensure_ascii=False), file=out)
        return 0
    style = _Style(out)
    for k, i in enumerate(shown, 1):
        _print_pair(out, style, k, len(shown), pairs[i], cuts.get(i), tokenizer, args)
    _print_summary(out, style, summary)
    return 0


def _summary(
    args: argparse.Namespace,
    pairs: list[PreferencePair],
    report: SkipReport,
    stats: _Stats,
    tokenizer: PreTrainedTokenizerBase | None,
) -> dict[str, Any]:
    kept = len(pairs)
    formats = sorted({p.format for p in pairs})
    summary: dict[str, Any] = {
        "dataset": os.fspath(args.dataset),
        "format": formats[0] if len(formats) == 1 else formats,
        "rows_read": report.total_read,
        "pairs_kept": report.kept,
        "skipped": {
            "total": report.skipped,
            "reasons": {
                reason: {"count": n, "first": list(report.examples.get(reason, []))}
                for reason, n in sorted(report.counts.items(), key=lambda kv: (-kv[1], kv[0]))
            },
        },
        "duplicates": {
            "pairs": stats.duplicate_pairs,
            "prompts": stats.duplicate_prompts,
            "unique_prompts": len(stats.seen_prompts),
            "pair_examples": [list(e) for e in stats.duplicate_examples],
            "prompt_examples": [list(e) for e in stats.prompt_examples],
        },
        "tokenizer": args.tokenizer,
        "lengths": {
            "unit": "tokens" if tokenizer is not None else "characters",
            **{key: percentiles(values) for key, values in stats.lengths.items()},
        },
        "truncation": None,
    }
    if tokenizer is not None:
        summary["truncation"] = {
            "max_length": args.max_length,
            "max_prompt_length": args.max_prompt_length,
            "truncation": args.truncation,
            "applied": dict(sorted(stats.modes.items())),
            "prompts_cut": stats.prompts_cut,
            "prompts_cut_rate": stats.prompts_cut / kept,
            "pairs_response_cut": stats.responses_cut,
            "pairs_response_cut_rate": stats.responses_cut / kept,
        }
    return summary


class _Style:
    """ANSI colours when writing to a terminal (and NO_COLOR is unset), else plain text."""

    CODES = {"bold": "1", "dim": "2", "prompt": "1;36", "chosen": "1;32", "rejected": "1;31",
             "cut": "1;33"}

    def __init__(self, stream: TextIO) -> None:
        isatty = getattr(stream, "isatty", None)
        self.enabled = bool(isatty and isatty()) and not os.environ.get("NO_COLOR")

    def __call__(self, text: str, kind: str) -> str:
        if not self.enabled:
            return text
        return f"\033[{self.CODES[kind]}m{text}\033[0m"


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _cut_marker(style: _Style, n: int) -> str:
    return style(f"[… {_plural(n, 'token')} cut …]", "cut")


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _messages_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"[{m['role']}] {m['content']}" for m in messages)


def _print_pair(
    out: TextIO,
    style: _Style,
    k: int,
    total: int,
    pair: PreferencePair,
    cut: _Cut | None,
    tokenizer: PreTrainedTokenizerBase | None,
    args: argparse.Namespace,
) -> None:
    print(style(f"=== pair {k} of {total}: {pair.source} ({pair.format}) ===", "bold"), file=out)
    names = ("prompt", "chosen", "rejected")
    if cut is None or tokenizer is None:
        for name in names:
            value = getattr(pair, name)
            body = value if isinstance(value, str) else _messages_text(value)
            count = "" if isinstance(value, str) else _plural(len(value), "message") + ", "
            print(style(f"--- {name} ({count}{_chars(value)} chars) ---", name), file=out)
            print(body, file=out)
        print(file=out)
        return

    mode = cut.mode
    n = cut.prompt_cut
    info = f"{len(cut.prompt)} tokens"
    if n:
        info += f", cut to {len(cut.kept_prompt)}, {mode}"
    print(style(f"--- prompt ({info}) ---", "prompt"), file=out)
    if n:
        head = _decode(tokenizer, cut.kept_prompt[: cut.head])
        tail = _decode(tokenizer, cut.kept_prompt[cut.head :])
        print(f"{head}{_cut_marker(style, n)}{tail}", file=out)
    else:
        print(_decode(tokenizer, cut.prompt), file=out)
    for i, name in enumerate(names[1:]):
        n = cut.response_cut(i)
        info = f"{len(cut.responses[i])} tokens with EOS"
        if n:
            info += f", cut to {len(cut.kept_responses[i])}"
        print(style(f"--- {name} ({info}) ---", name), file=out)
        text = _decode(tokenizer, cut.kept_responses[i])
        print(f"{text}{_cut_marker(style, n)}" if n else text, file=out)
    print(file=out)


def _short(location: str) -> str:
    """``file:123`` -> ``123``: the file is named once, on the dataset line."""
    number = location.rpartition(":")[2]
    return number if number.isdigit() else location


def _locations(examples: Sequence[str], n: int) -> str:
    more = ", ..." if n > len(examples[:3]) else ""
    return f"at {', '.join(examples[:3])}{more}"


def _pct(n: int, total: int) -> str:
    return f"{n} of {total} ({100 * n / total:.1f}%)" if total else f"{n}"


def _print_summary(out: TextIO, style: _Style, s: dict[str, Any]) -> None:
    def line(label: str, value: Any) -> None:
        print(f"  {label:<29} {value}", file=out)

    print(style("=== statistics ===", "bold"), file=out)
    fmt = s["format"] if isinstance(s["format"], str) else ", ".join(s["format"])
    line("dataset", f"{s['dataset']} (format {fmt})")
    line("rows read", s["rows_read"])
    line("pairs kept", s["pairs_kept"])
    skipped = s["skipped"]
    line("rows skipped", skipped["total"])
    for reason, info in skipped["reasons"].items():
        first = [_short(x) for x in info["first"]]
        line(f"  {reason}", f"{info['count']}  {_locations(first, info['count'])}")
    dup = s["duplicates"]
    examples = [f"{_short(a)} = {_short(b)}" for a, b in dup["pair_examples"]]
    line("duplicate pairs", f"{dup['pairs']}  {_locations(examples, dup['pairs'])}"
         if dup["pairs"] else 0)
    examples = [f"{_short(a)} = {_short(b)}" for a, b in dup["prompt_examples"]]
    line("repeated prompts", f"{dup['prompts']} ({dup['unique_prompts']} distinct prompts)")
    if dup["prompts"]:
        line("", _locations(examples, dup["prompts"]))

    lengths = s["lengths"]
    unit = lengths["unit"]
    where = f", {s['tokenizer']}" if s["tokenizer"] else "; --tokenizer for tokens"
    print(f"  lengths ({unit}{where})", file=out)
    columns = [*(f"p{p}" for p in PERCENTILES), "max"]
    print(f"    {'':<10}" + "".join(f"{c:>8}" for c in columns), file=out)
    for key in LENGTH_KEYS:
        row = lengths[key]
        print(f"    {key:<10}" + "".join(f"{row[c]:>8}" for c in columns), file=out)
    if unit == "tokens":
        print("    (prompt with BOS where the tokenizer adds one, responses with EOS;", file=out)
        print("     total = prompt + longer response, before truncation)", file=out)
    else:
        print("    (total = prompt + longer response)", file=out)

    t = s["truncation"]
    if t is None:
        print("  truncation: give --tokenizer to see what training would cut", file=out)
        return
    applied = ", ".join(t["applied"])
    mode = f"{applied} (auto)" if t["truncation"] == "auto" else applied
    print(f"  truncation at max_length {t['max_length']}, max_prompt_length "
          f"{t['max_prompt_length']}, {mode}", file=out)
    kept = s["pairs_kept"]
    line("  prompts cut", _pct(t["prompts_cut"], kept))
    line("  pairs with a response cut", _pct(t["pairs_response_cut"], kept))


# ---------------------------------------------------------------------------------------------
# convert


def pair_record(
    pair: PreferencePair, tokenizer: PreTrainedTokenizerBase | None = None
) -> dict[str, Any]:
    """The explicit JSON record of a pair, which read_pairs reads back to the same contents.

    Conversational pairs stay message lists (rendered to text by ``tokenizer``'s chat template
    when one is given). Their responses are written without the prompt messages, except when a
    response itself starts with the prompt messages, which read_pairs would take for a full
    conversation: then both are written as full conversations, which it splits back exactly.
    """
    if not pair.is_conversational:
        return {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
    if tokenizer is not None:
        prompt, chosen, rejected = render_chat(pair, tokenizer)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    prompt = [dict(m) for m in pair.prompt]  # type: ignore[union-attr]
    chosen = [dict(m) for m in pair.chosen]  # type: ignore[union-attr]
    rejected = [dict(m) for m in pair.rejected]  # type: ignore[union-attr]
    n = len(prompt)
    if any(r[:n] == prompt for r in (chosen, rejected)):
        chosen, rejected = prompt + chosen, prompt + rejected
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def write_jsonl_atomic(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` as JSON lines (gzip for ``.gz``) via a temporary file and a rename.

    Returns the number of records. On any error (including one raised while ``records`` is
    being produced) the temporary file is removed and ``path`` is left as it was.
    """
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with open(tmp, "wb") as raw:
            if path.name.lower().endswith(".gz"):
                stream: Any = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0)
            else:
                stream = raw
            for record in records:
                stream.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                count += 1
            if stream is not raw:
                stream.close()

    atomic_write(path, write)
    return count


def run_convert(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if not output.name.lower().endswith(OUTPUT_SUFFIXES):
        raise CommandError(f"{output}: the output must end with .jsonl or .jsonl.gz (JSON lines)")
    if output.is_dir():
        raise CommandError(f"{output}: is a directory, expected a file name")
    if output.exists() and not args.force:
        raise CommandError(f"{output}: already exists; use --force to overwrite it")
    if not output.parent.is_dir():
        raise CommandError(f"{output}: no such folder {str(output.parent)!r}")

    report = SkipReport()
    reader = _open_pairs(args, report, quiet=False)  # the skip summary goes to stderr
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    formats: dict[str, int] = {}

    def records() -> Iterator[dict[str, Any]]:
        for pair in reader:
            formats[pair.format] = formats.get(pair.format, 0) + 1
            yield pair_record(pair, tokenizer)

    try:
        count = write_jsonl_atomic(output, records())
    except OSError as e:
        raise CommandError(f"{output}: cannot write ({e.strerror or e})") from None
    source = ", ".join(formats)
    print(f"wrote {count} pairs to {output} (read {report.total_read} rows of {source} from "
          f"{args.dataset})")
    if "hh" in formats:
        print("note: hh prompts are cut keep_end by default, the converted file keep_start: "
              "train it with truncation=keep_end to cut prompts as before", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
