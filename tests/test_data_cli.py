"""`preftune data inspect` and `preftune data convert` on the real data and tokenizers."""

from __future__ import annotations

import gzip
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from preftune.cli import main
from preftune.config import TrainConfig
from preftune.data import SkipReport, load_pairs, read_pairs, render_chat, tokenize_pair
from preftune.data import cli as data_cli

from .conftest import ASSETS, GPT2_TOKENIZER, HH_HELPFUL

QWEN_TOKENIZER = ASSETS / "tokenizers" / "qwen2.5"
PHI3_TOKENIZER = ASSETS / "tokenizers" / "phi-3-mini"
SHAREGPT = ASSETS / "data" / "llamafactory" / "dpo_en_demo.json"
STACK_EXCHANGE = ASSETS / "data" / "stack-exchange-paired" / "tiny.json"

# The project's golden counts for HH helpful-base test, and with GPT-2 at 512/256 (keep_end).
HH_ROWS, HH_KEPT = 2354, 2346
HH_SKIPPED = {"empty response": 4, "prompt mismatch": 2, "identical responses": 2}
HH_GPT2_PROMPTS_CUT, HH_GPT2_RESPONSES_CUT = 91, 13
ANSI = "\033["


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: object) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("preftune: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def gpt2():
    return AutoTokenizer.from_pretrained(GPT2_TOKENIZER)


@pytest.fixture(scope="module")
def qwen():
    return AutoTokenizer.from_pretrained(QWEN_TOKENIZER)


# ------------------------------------------------------------------------------- inspect


def test_inspect_hh_gpt2_golden_statistics(capsys):
    stats = run_json(capsys, "data", "inspect", HH_HELPFUL, "--tokenizer", GPT2_TOKENIZER)
    assert stats["format"] == "hh"
    assert (stats["rows_read"], stats["pairs_kept"]) == (HH_ROWS, HH_KEPT)
    assert stats["skipped"]["total"] == HH_ROWS - HH_KEPT
    reasons = stats["skipped"]["reasons"]
    assert {r: v["count"] for r, v in reasons.items()} == HH_SKIPPED
    for info in reasons.values():  # the first locations, as FILE:LINE
        assert info["first"] and all(re.fullmatch(rf"{re.escape(str(HH_HELPFUL))}:\d+", x)
                                     for x in info["first"])
    assert stats["duplicates"]["pairs"] == 0
    # every kept HH test pair has its own prompt
    assert (stats["duplicates"]["unique_prompts"], stats["duplicates"]["prompts"]) == (HH_KEPT, 0)

    t = stats["truncation"]
    assert (t["max_length"], t["max_prompt_length"], t["truncation"]) == (512, 256, "auto")
    assert t["applied"] == {"keep_end": HH_KEPT}
    assert t["prompts_cut"] == HH_GPT2_PROMPTS_CUT
    assert t["pairs_response_cut"] == HH_GPT2_RESPONSES_CUT
    assert t["prompts_cut_rate"] == pytest.approx(HH_GPT2_PROMPTS_CUT / HH_KEPT)

    lengths = stats["lengths"]
    assert lengths["unit"] == "tokens"
    assert lengths["prompt"] == {"p50": 102, "p90": 307, "p99": 596, "max": 945}  # GPT-2 tokens
    for key in ("chosen", "rejected", "total"):
        row = lengths[key]
        assert 0 < row["p50"] <= row["p90"] <= row["p99"] <= row["max"]
    # More than 91 prompts are over 256 tokens, but only those of too-long pairs are cut.
    assert lengths["prompt"]["p90"] > 256 and lengths["total"]["max"] > 512


def test_inspect_defaults_come_from_the_training_config():
    fields = TrainConfig.__dataclass_fields__
    defaults = tuple(fields[k].default for k in ("max_length", "max_prompt_length", "truncation"))
    parsed = data_cli.build_parser().parse_args(["inspect", "pairs.jsonl"])
    assert (parsed.max_length, parsed.max_prompt_length, parsed.truncation) == defaults


def test_inspect_hh_gpt2_text_output(capsys):
    code, out, err = run(capsys, "data", "inspect", HH_HELPFUL, "--tokenizer", GPT2_TOKENIZER,
                         "--n", 2, "--seed", 1)
    assert code == 0 and err == ""
    assert ANSI not in out  # not a terminal: no colour
    assert out.count("=== pair ") == 2
    for name in ("prompt", "chosen", "rejected"):
        assert out.count(f"--- {name} (") == 2
    assert re.search(r"rows read\s+2354\n", out)
    assert re.search(r"pairs kept\s+2346\n", out)
    assert re.search(r"empty response\s+4  at \d+, \d+, \d+, \.\.\.\n", out)
    assert re.search(r"prompt mismatch\s+2  at \d+, \d+\n", out)
    assert "truncation at max_length 512, max_prompt_length 256, keep_end (auto)" in out
    assert re.search(rf"prompts cut\s+{HH_GPT2_PROMPTS_CUT} of 2346 \(3\.9%\)", out)
    assert re.search(rf"pairs with a response cut\s+{HH_GPT2_RESPONSES_CUT} of 2346 \(0\.6%\)",
                     out)
    assert re.search(r"^\s+prompt(\s+\d+){4}$", out, re.M)


def test_console_script():
    script = Path(sys.executable).parent / "preftune"
    result = subprocess.run(
        [str(script), "data", "inspect", str(HH_HELPFUL), "--n", "1"],
        capture_output=True, text=True, encoding="utf-8", timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("=== pair ") == 1 and ANSI not in result.stdout
    assert re.search(r"pairs kept\s+2346\n", result.stdout)
    assert "lengths (characters" in result.stdout

    result = subprocess.run([str(script), "data", "inspect", "missing.jsonl"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "preftune: error: missing.jsonl: no such file\n"


def sections(out: str) -> list[tuple[str, str]]:
    """(header, body) of each prompt/chosen/rejected section of inspect's text output."""
    parts = re.split(r"^(--- .* ---|=== .* ===)\n", out, flags=re.M)
    found = []
    for header, body in zip(parts[1::2], parts[2::2], strict=True):
        if header.startswith("--- "):
            body = body.removesuffix("\n")  # print's newline
            if header.startswith("--- rejected"):
                body = body.removesuffix("\n")  # the blank line after each pair
            found.append((header, body))
    return found


def test_inspect_makes_truncation_visible(capsys):
    # Every pair shown: each header that says "cut" has its marker where the mode cuts.
    args = ("data", "inspect", STACK_EXCHANGE, "--tokenizer", GPT2_TOKENIZER,
            "--max-length", 256, "--max-prompt-length", 128)
    stats = run_json(capsys, *args)
    assert stats["truncation"]["applied"] == {"keep_start": 25}
    for mode in ("keep_start", "keep_end"):
        code, out, _ = run(capsys, *args, "--n", 100, "--truncation", mode)
        assert code == 0
        assert out.count("=== pair ") == stats["pairs_kept"] == 25
        found = sections(out)
        assert len(found) == 3 * 25
        prompts_cut = responses_cut = 0
        for header, body in found:
            cut = re.fullmatch(r"--- (\w+) \((\d+) tokens(?: with EOS)?(?:, cut to (\d+)"
                               r"(?:, (\w+))?)?\) ---", header)
            assert cut, header
            name, total, kept, shown_mode = cut.groups()
            if kept is None:
                assert "tokens cut" not in body
                continue
            marker = f"[… {int(total) - int(kept)} tokens cut …]"
            assert body.count(marker) == 1
            if name == "prompt":
                prompts_cut += 1
                assert (int(kept), shown_mode) == (128, mode)
                # GPT-2 adds no BOS, so keep_end's marker opens the prompt.
                assert body.endswith(marker) if mode == "keep_start" else body.startswith(marker)
            else:
                responses_cut += 1
                assert int(kept) == 256 - 128 and body.endswith(marker)
        assert prompts_cut == stats["truncation"]["prompts_cut"] > 0
        assert responses_cut >= stats["truncation"]["pairs_response_cut"] > 0


@pytest.mark.parametrize("bos", [False, True], ids=["gpt2", "phi3-with-bos"])
@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_inspect_cuts_exactly_what_tokenize_pair_keeps(bos, mode):
    tokenizer = (AutoTokenizer.from_pretrained(PHI3_TOKENIZER, add_bos_token=True) if bos
                 else AutoTokenizer.from_pretrained(GPT2_TOKENIZER))
    pairs, _ = load_pairs(STACK_EXCHANGE, quiet=True)
    cuts = 0
    for pair in pairs:
        cut = data_cli._cut_pair(pair, tokenizer, 256, 128, mode)
        ids = tokenize_pair(pair, tokenizer, max_length=256, max_prompt_length=128,
                            truncation=mode)
        n = len(ids["prompt_input_ids"])
        assert cut.kept_prompt == ids["prompt_input_ids"]
        assert cut.kept_responses == [ids["chosen_labels"][n:], ids["rejected_labels"][n:]]
        # What is shown around the marker is the front and back of the untruncated prompt.
        assert cut.kept_prompt[: cut.head] == cut.prompt[: cut.head]
        back = len(cut.kept_prompt) - cut.head
        assert cut.kept_prompt[cut.head :] == (cut.prompt[len(cut.prompt) - back :] if back
                                               else [])
        cuts += cut.prompt_cut > 0
    assert cuts > 0
    if bos:
        assert cut.prompt[0] == cut.kept_prompt[0] == tokenizer.bos_token_id
        if mode == "keep_end":  # the BOS stays in front of the cut
            assert cut.head == 1


def test_inspect_sharegpt_with_the_qwen_chat_template(capsys, qwen):
    code, out, err = run(capsys, "data", "inspect", SHAREGPT, "--tokenizer", QWEN_TOKENIZER,
                         "--n", 2)
    assert code == 0 and err == ""
    assert out.count("=== pair ") == 2
    assert f"{SHAREGPT} (format conversational)" in out
    assert re.search(r"rows read\s+300\n", out) and re.search(r"pairs kept\s+300\n", out)
    assert re.search(r"rows skipped\s+0\n", out)
    assert re.search(r"duplicate pairs\s+5  at ", out)  # the demo file repeats five rows
    assert "max_length 512, max_prompt_length 256, keep_end (auto)" in out
    assert re.search(r"prompts cut\s+130 of 300 \(43\.3%\)", out)
    assert re.search(r"pairs with a response cut\s+178 of 300 \(59\.3%\)", out)
    assert re.search(r"^\s+prompt\s+182\s+1100\s+1737\s+3335$", out, re.M)
    # The prompt is the chat rendering, generation prompt included; responses end the turn.
    found = sections(out)
    assert [h.split(" (")[0] for h, _ in found] == ["--- prompt", "--- chosen",
                                                    "--- rejected"] * 2
    for header, body in found:
        if header.startswith("--- prompt"):
            # keep_end: a long conversation loses its start, never the generation prompt
            assert body.startswith(("<|im_start|>system\n", "[… "))
            assert body.endswith("<|im_start|>assistant\n")
        elif "cut to" not in header:
            assert body.rstrip().endswith("<|im_end|>")

    # The numbers agree with tokenize_pair on the pairs themselves.
    pairs, _ = load_pairs(SHAREGPT, quiet=True)
    for pair in pairs[:20]:
        cut = data_cli._cut_pair(pair, qwen, 512, 256, "keep_end")
        ids = tokenize_pair(pair, qwen)
        assert cut.kept_prompt == ids["prompt_input_ids"]


def test_inspect_without_tokenizer_counts_characters(capsys):
    stats = run_json(capsys, "data", "inspect", HH_HELPFUL)
    assert (stats["rows_read"], stats["pairs_kept"]) == (HH_ROWS, HH_KEPT)
    assert stats["lengths"]["unit"] == "characters"
    assert stats["truncation"] is None and stats["tokenizer"] is None
    pairs, _ = load_pairs(HH_HELPFUL, quiet=True)
    assert stats["lengths"]["prompt"]["max"] == max(len(p.prompt) for p in pairs)

    code, out, err = run(capsys, "data", "inspect", SHAREGPT, "--n", 1)
    assert code == 0 and err == ""
    assert "--- prompt (1 message, " in out and "[user] " in out and "[assistant] " in out
    assert "lengths (characters" in out and "give --tokenizer" in out
    assert re.search(r"duplicate pairs\s+5  at 158 = 14, ", out)


def test_inspect_counts_duplicates(tmp_path, capsys):
    rows = [{"prompt": "P1", "chosen": "a", "rejected": "b"},
            {"prompt": "P2", "chosen": "a", "rejected": "b"},
            {"prompt": "P1", "chosen": "a", "rejected": "b"},  # duplicate pair
            {"prompt": "P1", "chosen": "c", "rejected": "b"},  # repeated prompt only
            {"prompt": "P3", "chosen": "a", "rejected": "a"}]  # skipped: identical
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    stats = run_json(capsys, "data", "inspect", path)
    dup = stats["duplicates"]
    assert (dup["pairs"], dup["prompts"], dup["unique_prompts"]) == (1, 2, 2)
    assert dup["pair_examples"] == [[f"{path}:3", f"{path}:1"]]
    assert stats["skipped"]["reasons"] == {"identical responses": {"count": 1,
                                                                   "first": [f"{path}:5"]}}


def test_percentiles_nearest_rank():
    assert data_cli.percentiles(range(1, 101)) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert data_cli.percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7, "max": 7}
    assert data_cli.percentiles([3, 1, 2]) == {"p50": 2, "p90": 3, "p99": 3, "max": 3}


def test_colour_only_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert data_cli._Style(Terminal())("x", "cut").startswith(ANSI)
    assert data_cli._Style(io.StringIO())("x", "cut") == "x"
    monkeypatch.setenv("NO_COLOR", "1")
    assert data_cli._Style(Terminal())("x", "cut") == "x"


# ------------------------------------------------------------------------------- convert


def contents(pair) -> tuple:
    return pair.prompt, pair.chosen, pair.rejected


def test_convert_hh_round_trip(tmp_path, capsys):
    out_path = tmp_path / "hh.jsonl"
    code, out, err = run(capsys, "data", "convert", HH_HELPFUL, out_path)
    assert code == 0, err
    assert f"wrote {HH_KEPT} pairs to {out_path}" in out
    assert "skipped 8 of 2354 rows: empty response 4" in err  # the summary training prints
    assert "truncation=keep_end" in err  # hh is cut keep_end by default, explicit keep_start
    assert list(tmp_path.iterdir()) == [out_path]

    original, _ = load_pairs(HH_HELPFUL, quiet=True)
    report = SkipReport()
    converted = list(read_pairs(out_path, format="explicit", report=report, quiet=True))
    assert [contents(p) for p in converted] == [contents(p) for p in original]
    assert report.skipped == 0
    first = json.loads(out_path.read_text(encoding="utf-8").splitlines()[0])
    assert list(first) == ["prompt", "chosen", "rejected"]
    assert all(isinstance(v, str) for v in first.values())
    # Detection reads it back as explicit too.
    assert {p.format for p in read_pairs(out_path, quiet=True)} == {"explicit"}


def test_convert_conversational_round_trip_gzip(tmp_path, capsys):
    out_path = tmp_path / "sharegpt.jsonl.gz"
    code, out, err = run(capsys, "data", "convert", SHAREGPT, out_path)
    assert code == 0, err
    assert "wrote 300 pairs" in out
    original, _ = load_pairs(SHAREGPT, quiet=True)
    converted, report = load_pairs(out_path, quiet=True)
    assert report.skipped == 0
    assert [contents(p) for p in converted] == [contents(p) for p in original]
    assert {p.format for p in converted} == {"conversational"}
    with gzip.open(out_path, "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert first["prompt"][0]["role"] in ("system", "user")
    assert [m["role"] for m in first["chosen"]] == ["assistant"]


def test_convert_conversational_response_that_repeats_the_prompt(tmp_path, capsys):
    # A response starting with the prompt's messages would read back as a full conversation:
    # such pairs are written as full conversations, which read back exactly.
    hi = {"role": "assistant", "content": "Hi"}
    rows = [{"chosen": [hi, hi, {"role": "user", "content": "x"}],
             "rejected": [hi, {"role": "assistant", "content": "Bye"}]},
            {"prompt": [{"role": "user", "content": "q"}],
             "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]}]
    src = tmp_path / "conv.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    original, _ = load_pairs(src, quiet=True)
    assert original[0].chosen[0] == original[0].prompt[0]
    out_path = tmp_path / "out.jsonl"
    assert run(capsys, "data", "convert", src, out_path)[0] == 0
    converted, report = load_pairs(out_path, quiet=True)
    assert report.skipped == 0
    assert [contents(p) for p in converted] == [contents(p) for p in original]


def test_convert_renders_chat_with_a_tokenizer(tmp_path, capsys, qwen):
    src = tmp_path / "five.json"
    src.write_text(json.dumps(json.loads(SHAREGPT.read_text(encoding="utf-8"))[:5]),
                   encoding="utf-8")
    out_path = tmp_path / "rendered.jsonl"
    code, _, err = run(capsys, "data", "convert", src, out_path, "--tokenizer", QWEN_TOKENIZER)
    assert code == 0, err
    original, _ = load_pairs(src, quiet=True)
    converted, _ = load_pairs(out_path, format="explicit", quiet=True)
    assert [contents(p) for p in converted] == [render_chat(p, qwen) for p in original]
    assert converted[0].prompt.endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------------------- errors, help


def test_missing_dataset_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert_one_line_error(*run(capsys, "data", "inspect", missing)[::2], str(missing),
                          "no such file")
    out_path = tmp_path / "out.jsonl"
    assert_one_line_error(*run(capsys, "data", "convert", missing, out_path)[::2], str(missing))
    assert list(tmp_path.iterdir()) == []


def test_bad_format_name_is_a_one_line_error(capsys):
    code, out, err = run(capsys, "data", "inspect", HH_HELPFUL, "--format", "sharegpt")
    assert_one_line_error(code, err, "--format", "'sharegpt'", "conversational")
    assert out == ""


def test_bad_numbers_are_one_line_errors(capsys):
    code, _, err = run(capsys, "data", "inspect", HH_HELPFUL, "--max-length", 100,
                       "--max-prompt-length", 100)
    assert_one_line_error(code, err, "--max-prompt-length", "--max-length")
    assert_one_line_error(*run(capsys, "data", "inspect", HH_HELPFUL, "--n", -1)[::2], "--n")


def test_wrong_format_for_the_file_names_it(capsys):
    code, _, err = run(capsys, "data", "inspect", HH_HELPFUL, "--format", "shp")
    assert_one_line_error(code, err, "no usable pairs in", str(HH_HELPFUL))


def test_existing_output_needs_force(tmp_path, capsys):
    out_path = tmp_path / "out.jsonl"
    out_path.write_text("keep me\n", encoding="utf-8")
    code, _, err = run(capsys, "data", "convert", STACK_EXCHANGE, out_path)
    assert_one_line_error(code, err, str(out_path), "already exists", "--force")
    assert out_path.read_text(encoding="utf-8") == "keep me\n"

    code, _, err = run(capsys, "data", "convert", STACK_EXCHANGE, out_path, "--force")
    assert code == 0, err
    assert len(out_path.read_text(encoding="utf-8").splitlines()) == 25
    assert list(tmp_path.iterdir()) == [out_path]


def test_failure_midway_leaves_no_partial_output(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    src.write_text(f"{good}\n{good}\n{{not json\n", encoding="utf-8")
    out_path = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "data", "convert", src, out_path)
    assert_one_line_error(code, err, f"{src}:3", "invalid JSON")
    assert sorted(tmp_path.iterdir()) == [src]

    # Also when overwriting: the old output stays as it was.
    out_path.write_text("old\n", encoding="utf-8")
    code, _, err = run(capsys, "data", "convert", src, out_path, "--force")
    assert_one_line_error(code, err, f"{src}:3")
    assert out_path.read_text(encoding="utf-8") == "old\n"
    assert sorted(tmp_path.iterdir()) == [src, out_path]


def test_chat_rendering_without_a_template_names_the_row(tmp_path, capsys):
    out_path = tmp_path / "out.jsonl"
    code, _, err = run(capsys, "data", "convert", SHAREGPT, out_path, "--tokenizer",
                       GPT2_TOKENIZER)
    assert_one_line_error(code, err, f"{SHAREGPT}:1", "chat template")
    assert list(tmp_path.iterdir()) == []


def test_bad_output_paths(tmp_path, capsys):
    code, _, err = run(capsys, "data", "convert", STACK_EXCHANGE, tmp_path / "out.txt")
    assert_one_line_error(code, err, "out.txt", ".jsonl")
    code, _, err = run(capsys, "data", "convert", STACK_EXCHANGE, tmp_path / "no" / "o.jsonl")
    assert_one_line_error(code, err, "o.jsonl", "no such folder")


def test_missing_tokenizer_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run(capsys, "data", "inspect", STACK_EXCHANGE, "--tokenizer",
                       tmp_path / "no-tokenizer")
    assert_one_line_error(code, err, "no-tokenizer")


def test_help(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "preftune data" in out
    code, out, _ = run(capsys, "data", "--help")
    assert code == 0 and "inspect" in out and "convert" in out
    code, out, _ = run(capsys, "data", "inspect", "--help")
    assert code == 0
    for flag in ("--tokenizer", "--format", "--n", "--max-length", "--max-prompt-length",
                 "--truncation", "--seed", "--json"):
        assert flag in out
    assert "--max-length 512" in out and "--max-prompt-length 256" in out
    code, out, _ = run(capsys, "data", "convert", "--help")
    assert code == 0 and "--force" in out and "chat template" in out
    code, _, err = run(capsys, "data")
    assert code == 2 and "inspect" in err
    assert_one_line_error(*run(capsys, "data", "frobnicate")[::2], "frobnicate")


def test_data_command_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, preftune.data.cli, preftune.data; "
            "assert 'torch' not in sys.modules; preftune.data.collate_pairs; "
            "assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
