"""Readers, format detection and skip-and-report of preftune.data.formats."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from preftune.data import (
    FORMATS,
    DataError,
    PreferencePair,
    SkipReport,
    detect_format,
    load_pairs,
    read_pairs,
    split_shared_prompt,
)

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
DATA = ASSETS / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "data"
H, A = "\n\nHuman:", "\n\nAssistant:"


def fx(name: str) -> str:
    return str(FIXTURES / name)


# --- real data --------------------------------------------------------------------------------

# Golden numbers, checked by an independent script over the raw files (prompt = chosen up to
# its last "\n\nAssistant:"; mismatch if rejected does not start with it; then blank
# response; then identical responses).
HH_EXPECTED = {
    "helpful-base": (
        2354,
        {"empty response": 4, "prompt mismatch": 2, "identical responses": 2},
        {
            "empty response": [121, 741, 1215, 2064],
            "prompt mismatch": [568, 1167],
            "identical responses": [722, 2169],
        },
    ),
    "harmless-base": (
        2312,
        {"empty response": 4, "prompt mismatch": 4},
        {"empty response": [87, 517, 926, 1104], "prompt mismatch": [1255, 1689, 1953, 2037]},
    ),
}


@pytest.mark.parametrize("split", sorted(HH_EXPECTED))
def test_hh_real_split_counts_and_reconstruction(split: str, capsys) -> None:
    path = DATA / "hh-rlhf" / split / "test.jsonl.gz"
    total, counts, lines = HH_EXPECTED[split]
    pairs, report = load_pairs(path)
    assert report.total_read == total
    assert report.counts == counts
    assert report.kept == len(pairs) == total - sum(counts.values())
    assert report.examples == {r: [f"{path}:{n}" for n in ns] for r, ns in lines.items()}
    # The summary goes to stderr exactly once.
    err = capsys.readouterr().err
    assert err.count("skipped") == 1 and err.strip() == report.summary()

    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    for pair in pairs:
        assert pair.format == "hh" and not pair.is_conversational
        lineno = int(pair.source.rsplit(":", 1)[1])
        row = raw[lineno - 1]
        assert pair.prompt.endswith(A) and A not in pair.chosen
        assert pair.prompt + pair.chosen == row["chosen"]
        assert pair.prompt + pair.rejected == row["rejected"]
        assert pair.chosen != pair.rejected and pair.chosen.strip() and pair.rejected.strip()


def test_hh_detected_and_quiet(capsys) -> None:
    report = SkipReport()
    pairs = list(read_pairs(DATA / "hh-rlhf/helpful-base/test.jsonl.gz", report=report, quiet=True))
    assert len(pairs) == 2346 and report.skipped == 8
    assert capsys.readouterr().err == ""


def test_stack_exchange_real_sample() -> None:
    path = DATA / "stack-exchange-paired" / "tiny.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    pairs, report = load_pairs(path)
    assert report.skipped == 0 and len(pairs) == len(raw) == 25
    for i, (pair, row) in enumerate(zip(pairs, raw, strict=True), 1):
        assert pair.format == "stack-exchange-paired"
        assert pair.source == f"{path}:{i}"
        assert pair.prompt == "\n\nHuman: " + row["question"] + "\n\nAssistant:"
        assert pair.chosen == " " + row["response_j"]
        assert pair.rejected == " " + row["response_k"]


def test_sharegpt_real_demo() -> None:
    path = DATA / "llamafactory" / "dpo_en_demo.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    pairs, report = load_pairs(path)
    assert report.skipped == 0 and len(pairs) == 300
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    for pair, row in zip(pairs, raw, strict=True):
        assert pair.format == "conversational" and pair.is_conversational
        assert pair.prompt == [
            {"role": role[m["from"]], "content": m["value"]} for m in row["conversations"]
        ]
        assert pair.chosen == [{"role": "assistant", "content": row["chosen"]["value"]}]
        assert pair.rejected == [{"role": "assistant", "content": row["rejected"]["value"]}]
    assert sum(p.prompt[0]["role"] == "system" for p in pairs) == 80


# --- detection and per-format semantics ---------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"chosen": f"{H} a{A} b", "rejected": f"{H} a{A} c"}, "hh"),
        ({"chosen": "x y", "rejected": "x z"}, "implicit"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "explicit"),
        ({"prompt": [], "chosen": [], "rejected": []}, "conversational"),
        ({"chosen": [], "rejected": []}, "conversational"),
        ({"conversations": [], "chosen": {}, "rejected": {}}, "conversational"),
        ({"history": "", "human_ref_A": "", "human_ref_B": "", "labels": 1}, "shp"),
        ({"question": "", "response_j": "", "response_k": ""}, "stack-exchange-paired"),
        ({"prompt": "p", "chosen": ["a"], "rejected": "b"}, None),
        ({"chosen": {"from": "gpt"}, "rejected": {"from": "gpt"}}, None),
        ({"text": "t"}, None),
    ],
)
def test_detect_format(record: dict, expected: str | None) -> None:
    assert detect_format(record) == expected


@pytest.mark.parametrize(
    ("name", "fmt", "kept"),
    [
        ("hh.jsonl", "hh", 2),
        ("explicit.jsonl", "explicit", 2),
        ("implicit.jsonl", "implicit", 3),
        ("shp.jsonl", "shp", 2),
        ("sharegpt.json", "conversational", 3),
        ("conversational.jsonl", "conversational", 2),
        ("conversational_implicit.jsonl", "conversational", 2),
        ("explicit.csv", "explicit", 1),
        ("wrapped.json", "explicit", 1),
        ("lines.json", "explicit", 2),
    ],
)
def test_fixture_detection(name: str, fmt: str, kept: int) -> None:
    pairs, report = load_pairs(fx(name), quiet=True)
    assert {p.format for p in pairs} == {fmt}
    assert len(pairs) == report.kept == kept


def test_hh_semantics() -> None:
    pairs, _ = load_pairs(fx("hh.jsonl"))
    assert pairs[0] == PreferencePair(
        f"{H} Hi there{A}", " Hello! How can I help?", " Go away.", f"{fx('hh.jsonl')}:1", "hh"
    )
    assert pairs[1].prompt == f"{H} What is 2+2?{A} Let me think.{H} Well?{A}"
    assert (pairs[1].chosen, pairs[1].rejected) == (" It is 4.", " It is 5.")


def test_explicit_kept_as_is_with_line_sources() -> None:
    pairs, _ = load_pairs(fx("explicit.jsonl"))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Translate to French: cat", " chat", " chien"),
        ("Capital of France?", " Paris", " Lyon"),
    ]
    assert [p.source for p in pairs] == [f"{fx('explicit.jsonl')}:1", f"{fx('explicit.jsonl')}:2"]


def test_implicit_semantics() -> None:
    pairs, report = load_pairs(fx("implicit.jsonl"), quiet=True)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("User: Name a fruit.\nAssistant:", " An apple.", " A car."),
        ("Question: 2+2? Answer:", " 4", " 5"),
        ("The sky is", " blue", " green today"),
    ]
    assert report.counts == {"no shared prompt": 1, "identical responses": 1}
    assert report.examples["no shared prompt"] == [f"{fx('implicit.jsonl')}:4"]


def test_split_shared_prompt_whitespace_run() -> None:
    # The prompt stops before the whole last whitespace run, not inside it.
    assert split_shared_prompt("Q: x\n\nA one", "Q: x\n\nB two") == (
        "Q: x",
        "\n\nA one",
        "\n\nB two",
    )
    assert split_shared_prompt("abc", "abd") is None


def test_shp_semantics_and_score_ratio() -> None:
    path = fx("shp.jsonl")
    pairs, report = load_pairs(path, quiet=True)
    assert pairs[0] == PreferencePair(
        "\n\nHuman: How do I boil an egg?\n\nAssistant:",
        " Put it in boiling water.",
        " Microwave it.",
        f"{path}:1",
        "shp",
    )
    assert (pairs[1].chosen, pairs[1].rejected) == (" emacs", " vim")  # labels 0: B preferred
    assert report.counts == {"low score ratio": 1, "field 'labels' is not 0 or 1": 1}
    assert report.examples["low score ratio"] == [f"{path}:3"]
    loose, loose_report = load_pairs(path, min_score_ratio=1.0, quiet=True)
    assert len(loose) == 3 and loose_report.counts == {"field 'labels' is not 0 or 1": 1}


def test_sharegpt_fixture_roles_and_system() -> None:
    path = fx("sharegpt.json")
    pairs, report = load_pairs(path, quiet=True)
    assert pairs[1].prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another."},
    ]
    assert pairs[2].prompt[0] == {"role": "system", "content": "You are a pirate."}
    assert [p.source for p in pairs] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert report.counts == {"unknown role 'observation' in field 'conversations'": 1}


def test_trl_conversational() -> None:
    path = fx("conversational.jsonl")
    pairs, report = load_pairs(path, quiet=True)
    user = {"role": "user", "content": "2+2?"}
    assert pairs[1].prompt == [user]
    assert pairs[1].chosen == [{"role": "assistant", "content": "4"}]
    assert pairs[1].rejected == [{"role": "assistant", "content": "5"}]
    assert report.counts == {
        "prompt mismatch": 1,
        "empty prompt": 1,
        "response is not an assistant message": 1,
        "field 'prompt' is not a message list": 1,
    }
    assert report.examples["prompt mismatch"] == [f"{path}:3"]


def test_conversational_implicit_prompt() -> None:
    pairs, report = load_pairs(fx("conversational_implicit.jsonl"), quiet=True)
    assert pairs[1].prompt == [
        {"role": "user", "content": "A"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "C"},
    ]
    assert pairs[1].chosen == [{"role": "assistant", "content": "D"}]
    assert report.counts == {"no shared prompt": 1}


def test_format_override() -> None:
    # HH transcripts read as implicit: the prompt ends at the shared "Assistant:" too.
    pairs, _ = load_pairs(fx("hh.jsonl"), format="implicit")
    assert pairs[0].format == "implicit"
    assert (pairs[0].prompt, pairs[0].chosen) == (f"{H} Hi there{A}", " Hello! How can I help?")


# --- skip reasons, strict mode and the report ------------------------------------------------


def test_explicit_skip_reasons(capsys) -> None:
    path = fx("explicit_skips.jsonl")
    report = SkipReport()
    pairs = list(read_pairs(path, report=report))
    assert [p.prompt for p in pairs] == ["Q1", "Q6"]
    assert report.counts == {
        "identical responses": 1,
        "empty response": 1,
        "missing field 'chosen'": 1,
        "field 'chosen' is not a string": 1,
        "missing field 'prompt'": 1,
    }
    assert report.examples["missing field 'chosen'"] == [f"{path}:4"]
    assert (report.total_read, report.kept) == (7, 2)
    assert capsys.readouterr().err.strip() == report.summary()


def test_hh_skip_reasons() -> None:
    path = fx("hh_skips.jsonl")
    pairs, report = load_pairs(path, quiet=True)
    assert len(pairs) == 1
    assert report.counts == {
        "prompt mismatch": 1,
        "identical responses": 1,
        "empty response": 1,
        "no assistant turn": 1,
        "field 'rejected' is not a string": 1,
        "missing field 'rejected'": 1,
    }
    assert report.examples["prompt mismatch"] == [f"{path}:2"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("explicit_skips.jsonl", "explicit_skips.jsonl:2: identical responses"),
        ("hh_skips.jsonl", "hh_skips.jsonl:2: prompt mismatch (the rejected transcript"),
        ("implicit.jsonl", "implicit.jsonl:4: no shared prompt"),
        ("shp.jsonl", "shp.jsonl:3: low score ratio (score ratio 1.2 < 2)"),
        ("conversational.jsonl", "conversational.jsonl:3: prompt mismatch"),
    ],
)
def test_strict_raises_on_first_problem(name: str, message: str) -> None:
    with pytest.raises(DataError) as err:
        list(read_pairs(fx(name), strict=True))
    assert str(err.value).startswith(f"{fx(name)}:") and message in str(err.value)


def test_strict_names_field(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"prompt": "p", "chosen": " a", "rejected": " b"}\n{"prompt": "p", "chosen": 3}\n'
    )
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}:2: field 'chosen' is not a string \(got int\)$"
    ):
        list(read_pairs(path, strict=True))


def test_skip_report_summary_dict_and_write(tmp_path: Path) -> None:
    report = SkipReport()
    report.total_read, report.kept = 10, 3
    for i in range(6):
        report.add("identical responses", f"a.jsonl:{i + 1}")
    report.add("empty response", "a.jsonl:9")
    assert report.skipped == 7
    assert report.examples["identical responses"] == [f"a.jsonl:{i}" for i in range(1, 6)]
    assert report.summary() == (
        "skipped 7 of 10 rows: identical responses 6 (a.jsonl:1, a.jsonl:2, a.jsonl:3, ...); "
        "empty response 1 (a.jsonl:9)"
    )
    out = tmp_path / "skips.json"
    report.write(out)
    assert (
        json.loads(out.read_text())
        == report.to_dict()
        == {
            "total_read": 10,
            "kept": 3,
            "skipped": 7,
            "counts": {"identical responses": 6, "empty response": 1},
            "examples": {
                "identical responses": [f"a.jsonl:{i}" for i in range(1, 6)],
                "empty response": ["a.jsonl:9"],
            },
        }
    )
    assert SkipReport(total_read=4, kept=4).summary() == "kept all 4 rows"


# --- file formats ------------------------------------------------------------------------------


def _rows() -> list[dict]:
    return [
        {"prompt": "P1", "chosen": " a", "rejected": " b"},
        {"prompt": "P2", "chosen": " c", "rejected": " c"},
        {"prompt": "P3", "chosen": " e", "rejected": " f"},
    ]


def test_gzip_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in _rows()) + "\n")
    pairs, report = load_pairs(path, quiet=True)
    assert [p.prompt for p in pairs] == ["P1", "P3"]
    assert [p.source for p in pairs] == [f"{path}:1", f"{path}:3"]
    assert report.examples == {"identical responses": [f"{path}:2"]}


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(_rows()), path)
    pairs, report = load_pairs(path, quiet=True)
    assert [(p.prompt, p.chosen) for p in pairs] == [("P1", " a"), ("P3", " e")]
    assert pairs[1].source == f"{path}:3"
    assert report.counts == {"identical responses": 1}


def test_parquet_conversational(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def msg(role: str, content: str) -> dict[str, str]:
        return {"role": role, "content": content}

    rows = [
        {
            "prompt": [msg("user", "Hi")],
            "chosen": [msg("assistant", "Yo")],
            "rejected": [msg("assistant", "No")],
        }
    ]
    path = tmp_path / "conv.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    (pair,), _ = load_pairs(path)
    assert pair.format == "conversational" and pair.prompt == [msg("user", "Hi")]


def test_csv_multiline_cell_and_record_index() -> None:
    path = fx("explicit.csv")
    pairs, report = load_pairs(path, quiet=True)
    assert pairs[0].prompt == "Say hi,\nplease" and pairs[0].source == f"{path}:1"
    assert report.examples == {"empty response": [f"{path}:2"]}


def test_json_list_record_index_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "pairs.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(_rows(), indent=2).encode())
    pairs, _ = load_pairs(path, quiet=True)
    assert [p.source for p in pairs] == [f"{path}:1", f"{path}:3"]


# --- file-level errors ----------------------------------------------------------------------


def test_no_such_file_raises_at_call_time(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"^{re.escape(str(missing))}: no such file$"):
        read_pairs(missing)  # not only once iterated
    with pytest.raises(DataError, match=r"^data/train\.jsonl: no such file$"):
        read_pairs("data/train.jsonl")
    with pytest.raises(DataError, match=r"^\./some/dir/x: no such file$"):
        read_pairs("./some/dir/x")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path))}: is a directory"):
        read_pairs(tmp_path)


def test_bad_json_names_line() -> None:
    path = fx("bad_json.jsonl")
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}:3: invalid JSON: Expecting value \(column 45\)$"
    ):
        list(read_pairs(path))


def test_bad_json_in_json_list_names_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n {"prompt": "P", "chosen": " a", "rejected": " b"},\n {"prompt": }\n]\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: invalid JSON"):
        list(read_pairs(path))


def test_bad_json_lines_in_json_file(tmp_path: Path) -> None:
    row = json.dumps(_rows()[0])
    lines = tmp_path / "lines.json"
    lines.write_text(f"{row}\n{row}\n{{oops}}\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(lines))}:3: invalid JSON"):
        list(read_pairs(lines))
    trailing = tmp_path / "trailing.json"
    trailing.write_text(f"[\n{row}\n]\n]\n")
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(trailing))}:4: invalid JSON: Extra data"
    ):
        list(read_pairs(trailing))


@pytest.mark.parametrize("name", ["empty.jsonl", "blank.jsonl", "empty.json", "list.json"])
def test_empty_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(
        {"empty.jsonl": "", "blank.jsonl": "\n \n", "empty.json": "", "list.json": "[]"}[name]
    )
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: no records \(empty file\)$"):
        list(read_pairs(path))


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    good = json.dumps(_rows()[0]).encode()
    for suffix in (".jsonl", ".json"):
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(good + b"\n" + good + b"\n" + b'{"prompt": "caf\xe9", "chosen": " a"}\n')
        with pytest.raises(
            DataError, match=rf"^{re.escape(str(path))}:3: invalid UTF-8 \(byte 0xe9"
        ):
            list(read_pairs(path))


def test_undetectable_format_lists_fields_and_formats() -> None:
    path = fx("unknown.jsonl")
    with pytest.raises(DataError) as err:
        list(read_pairs(path))
    msg = str(err.value)
    assert msg.startswith(
        f"{path}:1: cannot detect the data format; fields found: text (str), score (int)"
    )
    assert all(name in msg for name in FORMATS) and "\n" not in msg


def test_unknown_format_name() -> None:
    with pytest.raises(DataError, match="unknown format 'sharegpt'; known formats: hh, shp, "):
        read_pairs(fx("sharegpt.json"), format="sharegpt")


def test_first_record_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "strings.json"
    path.write_text('["a", "b"]')
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}:1: record is a str, expected an object"
    ):
        list(read_pairs(path))


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: unsupported file type '\.txt'"):
        list(read_pairs(path))


def test_corrupt_gzip_and_parquet(tmp_path: Path) -> None:
    gz = tmp_path / "x.jsonl.gz"
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=rf"^{re.escape(str(gz))}: cannot read"):
        list(read_pairs(gz))
    pq_path = tmp_path / "x.parquet"
    pq_path.write_bytes(b"not parquet")
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(pq_path))}: not a readable Parquet file"
    ):
        list(read_pairs(pq_path))


# --- the Hub (faked: tests never touch the network) ---------------------------------------


def test_hub_failure_is_one_clear_line(monkeypatch) -> None:
    import datasets

    def offline(name, split=None, **_):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr("preftune.models.hub_reachable", lambda: True)  # an online failure
    with pytest.raises(DataError) as err:
        list(read_pairs("someone/prefs:test"))
    assert str(err.value) == (
        "someone/prefs:test: not a local file, and loading Hugging Face Hub dataset "
        "'someone/prefs' split 'test' failed (ConnectionError: Couldn't reach 'someone/prefs' "
        "on the Hub (LocalEntryNotFoundError))"
    )


def test_hub_dataset_offline_is_one_line_at_once(monkeypatch, caplog) -> None:
    import datasets
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: unreachable
    flags = huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    with pytest.raises(DataError) as err:
        list(read_pairs("preftune-tests/no-such-data:test"))
    assert str(err.value) == (
        "preftune-tests/no-such-data:test: not a local file nor in the Hugging Face datasets "
        "cache, and the Hub cannot be reached (offline); pass a local JSONL, JSON, Parquet or "
        "CSV file")
    # at once: nothing tried the network (the hub client logs each retry), and the offline
    # switch is undone afterwards
    assert not [r for r in caplog.records if r.name.startswith(("huggingface_hub", "datasets"))
                and r.levelname != "DEBUG"]
    assert flags == (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)


def test_hub_success_sources(monkeypatch) -> None:
    import datasets
    import huggingface_hub

    calls = []

    def fake(name, split=None, **_):  # offline here: datasets reads its cache, in offline mode
        calls.append((name, split, huggingface_hub.constants.HF_HUB_OFFLINE,
                      datasets.config.HF_HUB_OFFLINE))
        return datasets.Dataset.from_list(_rows())

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr("preftune.models.hub_reachable", lambda: False)
    pairs, report = load_pairs("someone/prefs", quiet=True)
    assert calls == [("someone/prefs", "train", True, True)]
    assert [p.source for p in pairs] == ["someone/prefs[train]:1", "someone/prefs[train]:3"]
    assert report.examples == {"identical responses": ["someone/prefs[train]:2"]}


def test_summary_printed_once_per_call(capsys) -> None:
    path = fx("explicit_skips.jsonl")
    report = SkipReport()
    list(read_pairs(path, report=report))
    list(read_pairs(fx("explicit.jsonl"), report=report))  # nothing new skipped: no print
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("skipped 5 of 7 rows:")


# ---------------------------------------------------------------- hostile files

BAD = Path(__file__).resolve().parent / "fixtures" / "bad"


def test_csv_cell_over_128_kib_is_read(tmp_path):
    """csv's default cell limit (128 KiB) rejected the whole file at one long cell."""
    pairs, report = load_pairs(BAD / "long_cell.csv", quiet=True)
    assert len(pairs) == 6 and report.skipped == 0
    assert pairs[1].prompt == "word " * 40_000


def test_csv_row_over_the_cell_limit_is_skipped_others_kept(monkeypatch):
    from preftune.data import formats

    monkeypatch.setattr(formats, "CSV_CELL_LIMIT", 100_000)
    path = BAD / "long_cell.csv"
    pairs, report = load_pairs(path, quiet=True)
    assert len(pairs) == 5
    assert report.counts == {"cell too long": 1} and report.examples == {
        "cell too long": [f"{path}:2"]}
    with pytest.raises(DataError, match=rf"^{path}:2: cell too long \(field 'prompt' has more "
                       r"than 100000 characters\)$"):
        load_pairs(path, strict=True)


@pytest.mark.parametrize(("text", "message"), [
    ('{"prompt": "p", "chosen": ' + "[" * 200_000 + "]" * 200_000 + ', "rejected": "r"}',
     "invalid JSON: nested too deeply"),
    ('{"prompt": "p", "chosen": ' + "7" * 5000 + ', "rejected": "r"}',
     "invalid JSON: Exceeds the limit (4300 digits) for integer string conversion: value has "
     "5000 digits"),
])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_hostile_json_is_one_line_error(tmp_path, text, message, suffix):
    path = tmp_path / f"pairs{suffix}"
    path.write_text(text + "\n")
    where = f"{path}:1" if suffix == ".jsonl" else str(path)
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert str(info.value) == f"{where}: {message}"


def test_non_regular_file_is_refused(tmp_path):
    import os

    fifo = tmp_path / "pairs.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"not a regular file"):
        read_pairs(fifo)


def test_damaged_parquet_page_names_the_file():
    path = BAD / "corrupt_page.parquet"
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: damaged Parquet data after "
                       r"row 0 \([^\n]+\)$"):
        load_pairs(path)


def test_skip_details_quote_bounded_values(tmp_path):
    path = tmp_path / "pairs.jsonl"
    row = {"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": "x" * 100_000,
           "score_A": 1, "score_B": 3}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError) as info:
        load_pairs(path, strict=True)
    assert str(info.value) == (f"{path}:1: field 'labels' is not a number (got "
                               f"'{'x' * 37}...{'x' * 38}')")
