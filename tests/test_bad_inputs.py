"""Malformed inputs through the real CLI: one line ``preftune: error: ...``, exit status 2.

Every case names the file and line (or record), the model folder, or the config key, and says
what is wrong; nothing prints a traceback (``--debug`` does) and a failed run leaves no
half-written output. Row-level data problems are skipped and reported instead (data_report.json,
a summary on stderr), unless ``strict_data=true``.

The data and config fixtures are in tests/fixtures/bad/ (its README.md lists them); broken model
and tokenizer folders are made here from the tiny model of conftest. A representative set runs
as real ``python -m preftune`` subprocesses (among them the inputs that used to end in a
traceback), started together beside the other tests because each one imports torch; the rest
call ``preftune.cli.main`` in-process with stdout/stderr captured at the file-descriptor level,
where an uncaught exception fails the test just as a traceback would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from preftune.cli import main
from preftune.data import DataError

from .conftest import tiny_llama

BAD = Path(__file__).resolve().parent / "fixtures" / "bad"
FAST = ["max_length=64", "max_prompt_length=32", "eval_examples=2", "n_samples=0",
        "batch_size=2", "micro_batch_size=2", "max_steps=1", "warmup_steps=0"]
# What a failed run may leave in its output_dir: the skip-and-report files, nothing else (and
# with them the marker that makes the folder preftune's, so that a rerun may write there).
ALLOWED_AFTER_ERROR = {"data_report.json", "eval_data_report.json", ".preftune-run"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# --- broken model and tokenizer folders --------------------------------------------------------


@dataclass(frozen=True)
class Models:
    good: Path  # tiny Llama + GPT-2 tokenizer (which has no pad token)
    no_weights: Path
    no_config: Path
    corrupt_safetensors: Path  # model.safetensors cut in half
    corrupt_bin: Path  # pytorch_model.bin that is not a checkpoint
    bad_config_json: Path  # config.json cut mid-object
    unknown_model_type: Path
    shape_mismatch: Path  # config.json says hidden_size 64, the weights are 32 wide
    missing_layer: Path  # config.json says 3 layers, the weights have 2
    no_tokenizer: Path  # config + weights only
    no_eos: Path  # tokenizer files only, eos_token and bos_token null
    small_vocab: Path  # weights with 1,000 embeddings, no tokenizer
    config_list: Path  # config.json is a JSON list
    zero_heads: Path  # config.json says num_attention_heads: 0


def _copy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory) -> Models:
    root = tmp_path_factory.mktemp("bad-models")
    good = tiny_model_dir
    weights = (good / "model.safetensors").read_bytes()
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json")

    corrupt = _copy(good, root / "corrupt-safetensors")
    (corrupt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    corrupt_bin = _copy(good, root / "corrupt-bin", skip=("model.safetensors",))
    (corrupt_bin / "pytorch_model.bin").write_bytes(b"not a pickle " * 8)
    bad_json = _copy(good, root / "bad-config-json")
    (bad_json / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    unknown = _copy(good, root / "unknown-model-type")
    _edit_json(unknown / "config.json", model_type="no-such-architecture")
    shape = _copy(good, root / "shape-mismatch")
    _edit_json(shape / "config.json", hidden_size=64, intermediate_size=128)
    layer = _copy(good, root / "missing-layer")
    _edit_json(layer / "config.json", num_hidden_layers=3)
    no_eos = _copy(good, root / "no-eos", skip=("model.safetensors", "config.json",
                                                "generation_config.json"))
    _edit_json(no_eos / "tokenizer_config.json", eos_token=None, bos_token=None)
    config_list = _copy(good, root / "config-list")
    (config_list / "config.json").write_text(f"[{(good / 'config.json').read_text()}]")
    zero_heads = _copy(good, root / "zero-heads")
    _edit_json(zero_heads / "config.json", num_attention_heads=0)
    small = root / "small-vocab"
    tiny_llama(vocab_size=1000).save_pretrained(small)
    return Models(
        good=good,
        no_weights=_copy(good, root / "no-weights", skip=("model.safetensors",)),
        no_config=_copy(good, root / "no-config", skip=("config.json",)),
        corrupt_safetensors=corrupt,
        corrupt_bin=corrupt_bin,
        bad_config_json=bad_json,
        unknown_model_type=unknown,
        shape_mismatch=shape,
        missing_layer=layer,
        no_tokenizer=_copy(good, root / "no-tokenizer", skip=tokenizer_files),
        no_eos=no_eos,
        small_vocab=small,
        config_list=config_list,
        zero_heads=zero_heads,
    )


# --- checks shared by every case -----------------------------------------------------------------


# A tqdm update, e.g. transformers' "Loading weights: 100%|#####| 21/21 [00:00<00:00, ...]".
PROGRESS = re.compile(r"[\w ]+: +\d+%\|.*\|")


def error_line(rc: int, stderr: str) -> str:
    """The message of the one ``preftune: error:`` line stderr must hold besides progress bars
    and the run's ``plan:`` line (printed before the model loads)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines()
             if line.strip() and not PROGRESS.match(line) and not line.startswith("plan: ")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("preftune: error: "), stderr
    assert rc == 2, stderr
    return lines[0].removeprefix("preftune: error: ")


def assert_no_partial_output(out: Path) -> None:
    """Not created, or holding at most the data reports: no final/, no logs, no temp files."""
    if out.exists():
        left = {p.name for p in out.iterdir()}
        assert left <= ALLOWED_AFTER_ERROR, sorted(left)


@dataclass(frozen=True)
class Case:
    """``argv`` after the stage; ``expect`` is the exact message, or a regex when ``regex``."""

    argv: list[str]
    expect: str
    regex: bool = False
    stage: str = "dpo"

    def check(self, message: str) -> None:
        if self.regex:
            assert re.fullmatch(self.expect, message), message
        else:
            assert message == self.expect


def _run_args(models: Models, out: Path, dataset: Path | str, *extra: str,
              model: Path | str | None = None) -> list[str]:
    return [f"model={model or models.good}", f"dataset={dataset}", f"output_dir={out}", *FAST,
            *extra]


# --- in-process: config, data and model errors ---------------------------------------------------


def _strict(name: str, line: int, what: str) -> Callable[[Models, Path], Case]:
    path = BAD / name
    return lambda m, out: Case(_run_args(m, out, path, "strict_data=true"),
                               f"{path}:{line}: {what}")


HH_MISMATCH = ("prompt mismatch (the rejected transcript does not start with the chosen "
               "transcript's prompt, which is everything up to its last '\\n\\nAssistant:')")
TEMPLATE = ("{p}:\\d+: conversational pair needs a chat template, but the tokenizer "
            "\\(GPT2Tokenizer\\w* '{m}'\\) has none; set tokenizer.chat_template or use a text "
            "format")

IN_PROCESS_CASES: dict[str, Callable[[Models, Path], Case]] = {
    # -- data files
    "invalid JSON mid-file": lambda m, out: Case(
        _run_args(m, out, BAD / "invalid_middle.jsonl"),
        f"{BAD / 'invalid_middle.jsonl'}:3: invalid JSON: Expecting property name enclosed in "
        "double quotes (column 2)"),
    "wrong field type, strict": _strict("wrong_type.jsonl", 3,
                                        "field 'chosen' is not a string (got int)"),
    "missing field, strict": _strict("missing_field.jsonl", 4, "missing field 'rejected'"),
    "empty response, strict": _strict("empty_response.jsonl", 2,
                                      "empty response (chosen response is empty)"),
    "identical responses, strict": _strict("identical.jsonl", 5, "identical responses"),
    "HH prompt mismatch, strict": _strict("hh_prompt_mismatch.jsonl", 3, HH_MISMATCH),
    "invalid UTF-8": lambda m, out: Case(
        _run_args(m, out, BAD / "invalid_utf8.jsonl"),
        f"{BAD / 'invalid_utf8.jsonl'}:2: invalid UTF-8 (byte 0xe9 at byte 16 of the line)"),
    "empty file": lambda m, out: Case(
        _run_args(m, out, BAD / "empty.jsonl"), f"{BAD / 'empty.jsonl'}: no records (empty file)"),
    "directory": lambda m, out: Case(
        _run_args(m, out, BAD), f"{BAD}: is a directory, expected a data file"),
    "nonexistent file": lambda m, out: Case(
        _run_args(m, out, BAD / "no-such-file.jsonl"),
        f"{BAD / 'no-such-file.jsonl'}: no such file"),
    "nonexistent eval_dataset": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", f"eval_dataset={BAD / 'no-such-eval.jsonl'}"),
        f"{BAD / 'no-such-eval.jsonl'}: no such file"),
    "unknown format": lambda m, out: Case(
        _run_args(m, out, BAD / "unknown_format.jsonl"),
        re.escape(f"{BAD / 'unknown_format.jsonl'}:1: cannot detect the data format; fields "
                  "found: question (str), answer (str), score (int); known formats: hh: ")
        + ".+" + re.escape("; choose one with dataset_format= (format= in read_pairs)"),
        regex=True),
    "forced wrong dataset_format": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", "dataset_format=hh"),
        "no usable pairs in {p}: skipped 6 of 6 rows: no assistant turn 6 ({p}:1, {p}:2, {p}:3, "
        "...)".format(p=BAD / "ok.jsonl")),
    "top-level JSON string": lambda m, out: Case(
        _run_args(m, out, BAD / "top_level_string.json"),
        f"{BAD / 'top_level_string.json'}: top-level JSON value is a str, expected a list of "
        "objects"),
    "records not objects": lambda m, out: Case(
        _run_args(m, out, BAD / "not_objects.jsonl"),
        f"{BAD / 'not_objects.jsonl'}:1: record is a list, expected an object with fields"),
    "unsupported suffix": lambda m, out: Case(
        _run_args(m, out, BAD / "pairs.txt"),
        f"{BAD / 'pairs.txt'}: unsupported file type '.txt'; expected .jsonl, .json, .gz, "
        ".parquet or .csv"),
    "not gzip": lambda m, out: Case(
        _run_args(m, out, BAD / "not_gzip.jsonl.gz"),
        re.escape(f"{BAD / 'not_gzip.jsonl.gz'}: cannot read (Not a gzipped file") + r".*\)",
        regex=True),
    "truncated gzip": lambda m, out: Case(
        _run_args(m, out, BAD / "cut_gzip.jsonl.gz"),
        re.escape(f"{BAD / 'cut_gzip.jsonl.gz'}: cannot read (") + r".*ended.*\)", regex=True),
    "not parquet": lambda m, out: Case(
        _run_args(m, out, BAD / "not_parquet.parquet"),
        re.escape(f"{BAD / 'not_parquet.parquet'}: not a readable Parquet file (") + r".+\)",
        regex=True),
    "fewer pairs than batch_size": lambda m, out: Case(
        _run_args(m, out, BAD / "too_few.jsonl"),
        re.escape("batch_size: 2 is more than the 1 training pairs") + ".*"
        + re.escape(str(BAD / "too_few.jsonl")) + ".*", regex=True),
    "conversational without chat template": lambda m, out: Case(
        _run_args(m, out, BAD / "conversational.jsonl"),
        TEMPLATE.format(p=re.escape(str(BAD / "conversational.jsonl")), m=re.escape(str(m.good))),
        regex=True),
    "JSON nested 200,000 deep": lambda m, out: Case(
        _run_args(m, out, BAD / "deep_nesting.jsonl"),
        f"{BAD / 'deep_nesting.jsonl'}:3: invalid JSON: nested too deeply"),
    "Parquet with a damaged page": lambda m, out: Case(
        _run_args(m, out, BAD / "corrupt_page.parquet"),
        re.escape(f"{BAD / 'corrupt_page.parquet'}: damaged Parquet data after row 0 (")
        + r"[^\n]+\)", regex=True),
    "field name with a newline": lambda m, out: Case(
        _run_args(m, out, BAD / "forged_field.jsonl"),
        re.escape(f"{BAD / 'forged_field.jsonl'}:1: cannot detect the data format; fields "
                  "found: question\\npreftune: error: forged (str), answer (str); known formats")
        + ".+", regex=True),
    # -- configuration
    "YAML alias bomb": lambda m, out: Case(
        [str(BAD / "alias_bomb.yaml")],
        f"{BAD / 'alias_bomb.yaml'}: line 1: invalid YAML (anchor or alias 'a': anchors and "
        "aliases are not allowed in a config)"),
    "duplicate YAML key": lambda m, out: Case(
        [str(BAD / "duplicate_key.yaml")],
        f"{BAD / 'duplicate_key.yaml'}: line 3: invalid YAML (duplicate key 'beta', first on "
        "line 1)"),
    "seed beyond 32 bits": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", "seed=4294967296"),
        "seed: expected an int in [0, 4294967295], got 4294967296"),
    "bad float value": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", "lr=fast"), "lr: expected a float, got 'fast'"),
    "negative beta": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", "beta=-0.1"), "beta: expected a float > 0, got -0.1"),
    "max_prompt_length == max_length": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", "max_prompt_length=64"),
        "max_prompt_length: must be < max_length (64), got 64"),
    "micro_batch_size > batch_size": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", "micro_batch_size=4"),
        "micro_batch_size: must be <= batch_size (2), got 4"),
    "label_smoothing with ipo": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", "loss=ipo", "label_smoothing=0.1"),
        "label_smoothing: only applies to loss=dpo or robust or exo_pair, got loss=ipo"),
    "dpo key for sft": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", "beta=0.2"),
        "unknown key 'beta'; it applies only to the dpo stage", stage="sft"),
    "model missing": lambda m, out: Case(
        [f"dataset={BAD / 'ok.jsonl'}"],
        "model: required (a local Hugging Face folder, a hub id, or an alias)"),
    "YAML typo": lambda m, out: Case(
        [str(BAD / "typo.yaml")],
        f"{BAD / 'typo.yaml'}: unknown key 'betta'; did you mean 'beta'?"),
    "YAML bad value": lambda m, out: Case(
        [str(BAD / "bad_value.yaml")],
        f"{BAD / 'bad_value.yaml'}: batch_size: expected an int, got 'many'"),
    "YAML not a mapping": lambda m, out: Case(
        [str(BAD / "not_mapping.yaml")],
        f"{BAD / 'not_mapping.yaml'}: expected a mapping of key: value, got list"),
    "YAML file missing": lambda m, out: Case(
        [str(BAD / "no-such-recipe.yaml")], f"{BAD / 'no-such-recipe.yaml'}: no such file"),
    # (root may write to a chmod 0o500 folder; nobody can make a folder under a regular file)
    "output_dir under a file": lambda m, out: Case(
        _run_args(m, out.parent / "file.txt" / "run", BAD / "ok.jsonl"),
        re.escape(f"output_dir: {out.parent / 'file.txt' / 'run'} is not writable (") + r".+\)",
        regex=True),
    "output_dir is a file": lambda m, out: Case(
        _run_args(m, out.parent / "file.txt", BAD / "ok.jsonl"),
        re.escape(f"output_dir: {out.parent / 'file.txt'} is not writable (") + r".+\)",
        regex=True),
    # -- models and tokenizers
    "nonexistent model": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", model=m.good.parent / "no-such-model"),
        f"{m.good.parent / 'no-such-model'}: no such model folder"),
    "model is a file": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", model=m.good / "config.json"),
        f"{m.good / 'config.json'}: not a model folder (a file)"),
    "hub model offline": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", model="preftune-tests/no-such-model"),
        "preftune-tests/no-such-model: not a local folder nor in the Hugging Face cache, and "
        "the Hub cannot be reached (offline); pass a local model folder, or the built-in alias "
        "smollm2-135m-instruct"),
    "model folder without weights": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", model=m.no_weights),
        f"{m.no_weights}: no model weights (*.safetensors or *.bin) found"),
    "model folder without config.json": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", model=m.no_config),
        f"{m.no_config}: no config.json, so not a Hugging Face model folder"),
    "config.json not JSON": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", model=m.bad_config_json),
        re.escape(f"{m.bad_config_json}: could not be loaded: ") + ".*config.json.*", regex=True),
    "unknown model_type": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", model=m.unknown_model_type),
        re.escape(f"{m.unknown_model_type}: could not be loaded: ") + ".*no-such-architecture.*",
        regex=True),
    "corrupt .bin weights": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", model=m.corrupt_bin),
        f"{m.corrupt_bin}: could not be loaded: a *.bin weights file is corrupt or not a plain "
        "PyTorch state dict"),
    "corrupt safetensors": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", model=m.corrupt_safetensors),
        re.escape(f"{m.corrupt_safetensors}: could not be loaded: a *.safetensors weights file "
                  "is corrupt or incomplete (") + r".+\)",
        regex=True),
    "weights of another shape": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", model=m.shape_mismatch),
        re.escape(f"{m.shape_mismatch}: weights do not match its config.json: ")
        + r"\d+ weights with another shape \("
        + re.escape("lm_head.weight: [50257, 32] in the checkpoint, [50257, 64] in config; ")
        + ".*", regex=True),
    "weights missing for a layer": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", model=m.missing_layer),
        f"{m.missing_layer}: weights do not match its config.json: 9 weights missing from the "
        "checkpoint (model.layers.2.input_layernorm.weight, model.layers.2.mlp.down_proj.weight, "
        "...)"),
    "config.json is a list": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", model=m.config_list),
        f"{m.config_list}: could not be loaded: config.json holds a JSON list, expected an "
        "object"),
    "config.json with num_attention_heads 0": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", model=m.zero_heads),
        f"{m.zero_heads}: could not be loaded: config.json: num_attention_heads must be a "
        "positive integer, got 0"),
    "model folder without tokenizer": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", model=m.no_tokenizer),
        f"{m.no_tokenizer}: no tokenizer files (tokenizer.json, tokenizer_config.json, "
        "vocab.json, tokenizer.model, ...); point tokenizer= at a folder that has them"),
    # (token ids past the embedding would end in an IndexError at the first forward pass)
    "tokenizer larger than the model's vocabulary": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", f"tokenizer={m.good}", model=m.small_vocab),
        "tokenizer: 50257 tokens, more than the model's vocabulary size 1000"),
    "reference with another vocabulary": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", f"reference={m.small_vocab}"),
        "reference: vocabulary size 1000 differs from model's 50257"),
}


@pytest.mark.parametrize("name", list(IN_PROCESS_CASES))
def test_one_line_error(name, models, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default output_dir would land here, not in the repo
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    (tmp_path / "file.txt").write_text("a regular file, for the output_dir cases\n")
    case = IN_PROCESS_CASES[name](models, out)
    rc = main([case.stage, *case.argv])
    case.check(error_line(rc, capfd.readouterr().err))
    assert_no_partial_output(out)
    assert (tmp_path / "file.txt").read_text().startswith("a regular file")


def test_fifo_dataset_is_refused(models, tmp_path, capfd):
    """Reading a FIFO named *.jsonl blocked forever; any file that is not regular is refused."""
    fifo = tmp_path / "pairs.jsonl"
    os.mkfifo(fifo)
    rc = main(["dpo", *_run_args(models, tmp_path / "run", fifo)])
    assert error_line(rc, capfd.readouterr().err) == (
        f"{fifo}: not a regular file (a FIFO, socket or device?); expected a data file")


def test_row_the_chat_template_rejects_is_skipped_and_reported(models, tmp_path, capfd):
    """A template that raises on one row (jinja's raise_exception, as "roles must alternate"
    templates do) used to abort the run; that row is now a skipped row like any other."""
    model = _copy(models.good, tmp_path / "chat-model")
    _edit_json(model / "tokenizer_config.json", chat_template=(
        "{% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception('no boom') }}"
        "{% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"))
    data = tmp_path / "chat.jsonl"
    rows = [{"prompt": [{"role": "user", "content": "boom" if i == 3 else f"q{i}"}],
             "chosen": [{"role": "assistant", "content": f"yes {i}"}],
             "rejected": [{"role": "assistant", "content": f"no {i}"}]} for i in range(1, 8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    rc = main(["dpo", *_run_args(models, out, data, model=model)])
    err = capfd.readouterr().err
    assert rc == 0, err
    assert (f"skipped 1 of 7 rows: chat template failed 1 (rows: {out}/data_report.json, "
            "preftune data inspect)") in err.splitlines()
    report = json.loads((out / "data_report.json").read_text())
    assert report["counts"] == {"chat template failed": 1} and report["kept"] == 6
    assert (out / "final" / "config.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(models, tmp_path, capfd):
    out = tmp_path / "run"
    rc = main(["dpo", *_run_args(models, out, BAD / "ok.jsonl", "device=cuda")])
    assert error_line(rc, capfd.readouterr().err) == (
        "device: 'cuda' requested but no CUDA device is available")
    assert_no_partial_output(out)


def test_debug_raises_in_process(models, tmp_path):
    with pytest.raises(DataError, match=r"truncated\.jsonl:5: invalid JSON"):
        main(["dpo", *_run_args(models, tmp_path / "run", BAD / "truncated.jsonl"), "--debug"])


# --- row-level problems: skipped and reported, the run succeeds ----------------------------------


def test_bad_rows_are_skipped_and_reported(models, tmp_path, capfd):
    """Also the tokenizer without a pad token (GPT-2): padding falls back to EOS and works."""
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(models.good).pad_token is None
    rows, hh = BAD / "row_problems.jsonl", BAD / "hh_prompt_mismatch.jsonl"
    out = tmp_path / "run"
    rc = main(["dpo", *_run_args(models, out, rows, f"eval_dataset={hh}")])
    captured = capfd.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.err and "preftune: error" not in captured.err
    assert (out / "final" / "config.json").is_file()

    report = json.loads((out / "data_report.json").read_text())
    assert report == {
        "total_read": 9, "kept": 5, "skipped": 4,
        "counts": {"field 'chosen' is not a string": 1, "missing field 'rejected'": 1,
                   "empty response": 1, "identical responses": 1},
        "examples": {"field 'chosen' is not a string": [f"{rows}:2"],
                     "missing field 'rejected'": [f"{rows}:4"],
                     "empty response": [f"{rows}:5"], "identical responses": [f"{rows}:7"]},
    }
    eval_report = json.loads((out / "eval_data_report.json").read_text())
    assert eval_report["counts"] == {"prompt mismatch": 1}
    assert eval_report["examples"] == {"prompt mismatch": [f"{hh}:3"]}
    lines = captured.err.splitlines()
    assert ("skipped 4 of 9 rows: empty response 1, field 'chosen' is not a string 1, "
            "identical responses 1, missing field 'rejected' 1 "
            f"(rows: {out}/data_report.json, preftune data inspect)") in lines
    assert (f"skipped 1 of 6 rows: prompt mismatch 1 (rows: {out}/eval_data_report.json, "
            "preftune data inspect)") in lines


# --- subprocesses: `python -m preftune`, as users run it ----------------------------------------
# They start when the module's first test does (see `launched`) and run beside the in-process
# tests; most of their time is importing torch and transformers.

# name -> (models, output_dir) -> Case
SUBPROCESS_CASES: dict[str, Callable[[Models, Path], Case]] = {
    "truncated JSON line": lambda m, out: Case(
        _run_args(m, out, BAD / "truncated.jsonl"),
        f"{BAD / 'truncated.jsonl'}:5: invalid JSON: Unterminated string starting at (column 12)",
    ),
    "no usable pair": lambda m, out: Case(
        _run_args(m, out, BAD / "all_skipped.jsonl"),
        "no usable pairs in {p}: skipped 4 of 4 rows: identical responses 2 ({p}:1, {p}:4); "
        "empty response 1 ({p}:2); missing field 'rejected' 1 ({p}:3)".format(
            p=BAD / "all_skipped.jsonl"),
    ),
    "hub dataset offline": lambda m, out: Case(
        _run_args(m, out, "preftune-tests/no-such-dataset:train"),
        "preftune-tests/no-such-dataset:train: not a local file nor in the Hugging Face datasets "
        "cache, and the Hub cannot be reached (offline); pass a local JSONL, JSON, Parquet or "
        "CSV file"),
    "tokenizer without EOS": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", f"tokenizer={m.no_eos}"),
        f"{m.no_eos}: the tokenizer has no EOS token; preftune ends every response with EOS, "
        "so set eos_token in its tokenizer_config.json",
    ),
    "YAML syntax error": lambda m, out: Case(
        [str(BAD / "syntax_error.yaml")],
        f"{BAD / 'syntax_error.yaml'}: line 4: invalid YAML (expected ',' or ']', but got ':')",
    ),
    "config key typo": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", "betta=0.2"),
        "unknown key 'betta'; did you mean 'beta'?"),
    "bad value": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", "batch_size=two"),
        "batch_size: expected an int, got 'two'"),
    "unknown dataset_format": lambda m, out: Case(
        _run_args(m, out, BAD / "ok.jsonl", "dataset_format=jsonl"),
        "dataset_format: expected one of hh, shp, stack-exchange-paired, explicit, implicit, "
        "conversational, got 'jsonl'"),
}


class Launched:
    """``python -m preftune`` subprocesses, all started at once; results collected on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.results: dict[str, tuple[int, str]] = {}
        self.env = {**os.environ, **OFFLINE}

    def out(self, name: str) -> Path:
        return self.root / re.sub(r"\W+", "-", name)

    def start(self, name: str, argv: list[str]) -> None:
        proc = subprocess.Popen([sys.executable, "-m", "preftune", *argv], cwd=self.root,
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        self.procs[name] = proc

    def result(self, name: str) -> tuple[int, str]:
        if name not in self.results:
            proc = self.procs[name]
            _, stderr = proc.communicate(timeout=300)
            self.results[name] = (proc.returncode, stderr)
        return self.results[name]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


SUBPROCESS_TESTS = ("test_subprocess_one_line_error", "test_debug_shows_the_traceback")


@pytest.fixture(scope="module", autouse=True)
def launched(request, models, tmp_path_factory):
    """Starts every subprocess case at the module's first test, if any of their tests is to run."""
    runs = Launched(tmp_path_factory.mktemp("cli-subprocess"))
    if not any(item.originalname in SUBPROCESS_TESTS for item in request.session.items):
        yield runs
        return
    for name, make in SUBPROCESS_CASES.items():
        case = make(models, runs.out(name))
        runs.start(name, [case.stage, *case.argv])
    runs.start("--debug", ["dpo", f"model={models.good}", f"dataset={BAD / 'ok.jsonl'}",
                           "beta=0", "--debug"])
    yield runs
    runs.stop()


@pytest.mark.parametrize("name", list(SUBPROCESS_CASES))
def test_subprocess_one_line_error(name, launched, models):
    rc, stderr = launched.result(name)
    out = launched.out(name)
    SUBPROCESS_CASES[name](models, out).check(error_line(rc, stderr))
    assert_no_partial_output(out)


def test_debug_shows_the_traceback(launched):
    rc, stderr = launched.result("--debug")
    assert rc not in (0, 2)
    assert stderr.startswith("Traceback (most recent call last):")
    assert stderr.strip().splitlines()[-1] == (
        "preftune.config.ConfigError: beta: expected a float > 0, got 0")
