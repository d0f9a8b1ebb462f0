import dataclasses
import re
import subprocess
import sys

import pytest

from preftune import losses
from preftune.config import (
    DATASET_FORMATS,
    ConfigError,
    DPOConfig,
    SFTConfig,
    config_help,
    config_to_dict,
    dump_config,
    load_config,
    parse_config,
    stage_config,
)

REQ = ["model=./m", "dataset=pairs.jsonl"]

SHARED_DEFAULTS = {
    "tokenizer": None, "dataset_format": None, "eval_dataset": None, "eval_examples": 256,
    "max_examples": None, "output_dir": None, "lr": 5e-7, "optimizer": "rmsprop",
    "weight_decay": 0.0, "warmup_steps": None, "scheduler": "constant", "batch_size": 64,
    "micro_batch_size": 8, "max_length": 512, "max_prompt_length": 256, "truncation": "auto",
    "epochs": 1, "max_steps": None, "eval_every": 300, "sample_every": None, "n_samples": 4,
    "max_new_tokens": 128, "max_grad_norm": 10.0, "seed": 0, "dtype": "float32", "compile": False,
    "master_weights": "float32", "reduce_dtype": "float32", "reduce_every_micro_batch": False,
    "gradient_checkpointing": True, "release_memory": True, "log_every": 1,
    "trust_remote_code": False,
    "device": "auto", "strict_data": False, "prompt_field": None, "chosen_field": None,
    "rejected_field": None, "messages_field": None, "save_every": None, "keep_checkpoints": 2,
    "resume": None, "max_nonfinite_steps": 3, "report_to": "none", "lora": False, "lora_r": 8,
    "lora_alpha": 16.0, "lora_dropout": 0.0, "lora_target_modules": "all-linear",
    "lora_export": "merged",
    "eval_scorer": None,
}
DPO_ONLY = {"reference": None, "loss": "dpo", "beta": 0.1, "label_smoothing": 0.0,
            "reference_free": False, "logps": "sum", "precompute_reference": True,
            "chunked_logps": True, "chunk_size": 256, "share_prompt": True, "pack": True,
            "segment_attention": True, "attention_kernel": "auto", "keep_activations": True,
            "simpo_gamma": 0.5, "loss_options": {}, "rpo_alpha": 0.0, "loss_weights": None,
            "divergence": "reverse_kl", "divergence_alpha": 0.5, "ld_alpha": None, "wpo": False,
            "sync_reference": "none", "sync_alpha": 0.6, "sync_every": 512}


def err(cls, args) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(cls, args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_sft():
    cfg = parse_config(SFTConfig, REQ)
    assert config_to_dict(cfg) == {"model": "./m", "dataset": "pairs.jsonl", **SHARED_DEFAULTS}


def test_defaults_dpo():
    cfg = parse_config(DPOConfig, REQ)
    want = {"model": "./m", "dataset": "pairs.jsonl", **SHARED_DEFAULTS, **DPO_ONLY}
    assert config_to_dict(cfg) == want
    assert list(config_to_dict(cfg)) != sorted(want)  # grouped, not alphabetical
    assert set(config_to_dict(cfg)) == {f.name for f in dataclasses.fields(DPOConfig)}


def test_stage_config():
    assert stage_config("sft") is SFTConfig
    assert stage_config("dpo") is DPOConfig
    with pytest.raises(ConfigError, match="unknown stage 'ppo'"):
        stage_config("ppo")


def test_config_module_imports_nothing_heavy():
    code = ("import sys, preftune.config; "
            "bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_yaml_then_overrides_win(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: from-file\ndataset: d.jsonl\nbeta: 0.5\nloss: ipo\nepochs: 3\n")
    cfg = parse_config(DPOConfig, [str(recipe), "beta=0.2", "model=./m"])
    assert (cfg.model, cfg.beta, cfg.loss, cfg.epochs, cfg.dataset) == (
        "./m", 0.2, "ipo", 3, "d.jsonl")
    cfg = load_config(DPOConfig, recipe, {"epochs": 2})
    assert (cfg.model, cfg.beta, cfg.epochs) == ("from-file", 0.5, 2)


def test_value_parsing():
    cfg = parse_config(DPOConfig, [*REQ, "lr=1e-6", "beta=1", "reference=./ref",
                                   "gradient_checkpointing=true", "max_steps=10"])
    assert cfg.lr == 1e-6 and isinstance(cfg.lr, float)
    assert cfg.beta == 1.0 and isinstance(cfg.beta, float)  # float fields accept ints
    assert cfg.reference == "./ref" and cfg.gradient_checkpointing is True
    assert cfg.max_steps == 10
    cfg = parse_config(DPOConfig, [*REQ, "reference=./ref", "reference=null", "max_steps=null"])
    assert cfg.reference is None and cfg.max_steps is None  # later overrides win


def test_choices_are_case_insensitive():
    assert parse_config(SFTConfig, [*REQ, "optimizer=RMSprop"]).optimizer == "rmsprop"


def test_yaml_file_scientific_notation(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\ndataset: d\nlr: 5e-6\n")  # PyYAML reads 5e-6 as a string
    assert load_config(SFTConfig, recipe).lr == 5e-6


def test_string_fields_keep_text_as_typed():
    cfg = parse_config(SFTConfig, ["model=0123", "dataset=org/name:train", "tokenizer=1.0"])
    assert (cfg.model, cfg.dataset, cfg.tokenizer) == ("0123", "org/name:train", "1.0")


def test_unknown_key_suggests():
    assert err(DPOConfig, [*REQ, "betta=0.2"]) == "unknown key 'betta'; did you mean 'beta'?"
    msg = err(DPOConfig, [*REQ, "zzzzqqq=1"])
    assert msg.startswith("unknown key 'zzzzqqq'") and "did you mean" not in msg
    assert err(SFTConfig, [*REQ, "beta=0.1"]) == (
        "unknown key 'beta'; it applies only to the dpo stage")


def test_unknown_yaml_key_names_file(tmp_path):
    recipe = tmp_path / "config.yaml"
    recipe.write_text("model: m\ndataset: d\nbetta: 0.2\n")
    assert err(DPOConfig, [str(recipe)]) == (
        f"{recipe}: unknown key 'betta'; did you mean 'beta'?")


def test_bad_yaml_value_names_file_unless_overridden(tmp_path):
    recipe = tmp_path / "config.yaml"
    recipe.write_text("model: m\ndataset: d\nbeta: -1\n")
    assert err(DPOConfig, [str(recipe)]) == f"{recipe}: beta: expected a float > 0, got -1"
    assert parse_config(DPOConfig, [str(recipe), "beta=0.3"]).beta == 0.3


@pytest.mark.parametrize("arg, message", [
    ("beta=-1", "beta: expected a float > 0, got -1"),
    ("beta=0", "beta: expected a float > 0, got 0"),
    ("lr=0", "lr: expected a float > 0, got 0"),
    ("lr=abc", "lr: expected a float, got 'abc'"),
    ("lr=true", "lr: expected a float, got true"),
    ("optimizer=sgd", "optimizer: expected one of rmsprop, adamw, got 'sgd'"),
    ("loss=kto", "loss: expected one of dpo, ipo, robust, hinge, simpo, bco_pair, exo_pair, "
     "nca_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, sft, "
     "got 'kto'"),
    ("dataset_format=weird", "dataset_format: expected one of "
     + ", ".join(DATASET_FORMATS) + ", got 'weird'"),
    ("batch_size=abc", "batch_size: expected an int, got 'abc'"),
    ("batch_size=1.5", "batch_size: expected an int, got 1.5"),
    ("batch_size=true", "batch_size: expected an int, got true"),
    ("batch_size=null", "batch_size: expected an int, got null"),
    ("epochs=0", "epochs: expected an int > 0, got 0"),
    ("max_steps=0", "max_steps: expected an int > 0, got 0"),
    ("warmup_steps=-1", "warmup_steps: expected an int >= 0, got -1"),
    ("eval_examples=-1", "eval_examples: expected an int >= 0, got -1"),
    ("n_samples=-1", "n_samples: expected an int >= 0, got -1"),
    ("label_smoothing=0.5", "label_smoothing: expected a float in [0, 0.5), got 0.5"),
    ("label_smoothing=-0.1", "label_smoothing: expected a float in [0, 0.5), got -0.1"),
    ("reference_free=yes_please", "reference_free: expected true or false, got 'yes_please'"),
    ("reference_free=1", "reference_free: expected true or false, got 1"),
    ("model=null", "model: required (a local Hugging Face folder, a hub id, or an alias)"),
])
def test_bad_values(arg, message):
    assert err(DPOConfig, [*REQ, arg]) == message


def test_required_fields():
    assert err(SFTConfig, ["dataset=d"]) == (
        "model: required (a local Hugging Face folder, a hub id, or an alias)")
    assert err(SFTConfig, ["model=m"]).startswith("dataset: required (")


@pytest.mark.parametrize("args, message", [
    (["max_length=256"], "max_prompt_length: must be < max_length (256), got 256"),
    (["max_prompt_length=600"], "max_prompt_length: must be < max_length (512), got 600"),
    (["micro_batch_size=128"], "micro_batch_size: must be <= batch_size (64), got 128"),
    (["loss=ipo", "label_smoothing=0.1"],
     "label_smoothing: only applies to loss=dpo or robust or exo_pair, got loss=ipo"),
])
def test_cross_field(args, message):
    assert err(DPOConfig, [*REQ, *args]) == message


def test_cross_field_boundaries_accepted():
    cfg = parse_config(DPOConfig, [*REQ, "max_prompt_length=511", "micro_batch_size=64",
                                   "label_smoothing=0.49", "eval_examples=0", "n_samples=0"])
    assert (cfg.micro_batch_size, cfg.label_smoothing) == (64, 0.49)
    assert parse_config(DPOConfig, [*REQ, "loss=ipo"]).label_smoothing == 0.0


def test_direct_construction_is_validated():
    assert SFTConfig(model="m", dataset="d", lr=1).lr == 1.0
    with pytest.raises(ConfigError, match="beta: expected a float > 0"):
        DPOConfig(model="m", dataset="d", beta=0)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        dataclasses.replace(SFTConfig(model="m", dataset="d"), batch_size=4)


def test_yaml_file_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert err(SFTConfig, [str(missing), *REQ]) == f"{missing}: no such file"
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    assert err(SFTConfig, [str(listy)]).startswith(f"{listy}: expected a mapping")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: m\ndataset: d\nbeta: [0.1\n")
    msg = err(DPOConfig, [str(broken)])
    assert msg.startswith(f"{broken}: line ") and "invalid YAML" in msg
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert parse_config(SFTConfig, [str(empty), *REQ]).model == "./m"


def test_only_first_arg_may_be_a_file():
    msg = err(SFTConfig, [*REQ, "recipe.yaml"])
    assert msg.startswith("unexpected argument 'recipe.yaml'")


@pytest.mark.parametrize("cls", [SFTConfig, DPOConfig])
def test_dump_load_round_trip(tmp_path, cls):
    extra = ["reference=./ref", "label_smoothing=0.2", "beta=0.05"] if cls is DPOConfig else []
    cfg = parse_config(cls, [*REQ, "lr=1e-6", "max_steps=7", "model=010", "tokenizer=true",
                             "dataset_format=hh", "output_dir=runs/x", *extra])
    path = tmp_path / "sub" / "config.yaml"
    dump_config(cfg, path)
    assert load_config(cls, path) == cfg
    assert parse_config(cls, [str(path)]) == cfg


def test_help_lists_every_field_with_type_and_default():
    text = config_help(DPOConfig)
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    # registered loss options without a field of their own are keys too (discopop_tau)
    options = {n for n, o in losses.OPTIONS.items() if o.config and n not in fields}
    assert set(lines) == fields | options
    assert lines["lr"].split()[1:3] == ["float", "5e-07"]
    assert lines["max_steps"].split()[1:3] == ["int|null", "null"]
    assert lines["model"].split()[1:3] == ["str", "(required)"]
    assert lines["gradient_checkpointing"].split()[1:3] == ["bool", "true"]
    assert lines["optimizer"].split()[1:3] == ["choice", "rmsprop"]
    assert "[rmsprop, adamw]" in lines["optimizer"]
    assert all(len(line.split()) > 3 for line in lines.values())  # every key has a meaning
    for col in (1, 2, 3):  # type, default and meaning columns start at the same place
        assert len({[m.start() for m in re.finditer(r"\S+", line)][col]
                    for line in lines.values()}) == 1
    assert "beta" not in config_help(SFTConfig).split()


# ---------------------------------------------------------------- hostile YAML and values


def test_yaml_aliases_are_refused_before_anything_expands(tmp_path):
    """A billion-laughs file: nine levels of nine aliases (9**9 strings if expanded)."""
    levels = ["a: &l0 [" + ", ".join(['"lol"'] * 9) + "]"]
    levels += [f"{chr(98 + i)}: &l{i + 1} [" + ", ".join([f"*l{i}"] * 9) + "]" for i in range(8)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(levels) + "\n")
    with pytest.raises(ConfigError, match=rf"^{path}: line 1: invalid YAML \(anchor or alias "
                       r"'l0': anchors and aliases are not allowed in a config\)$"):
        load_config(DPOConfig, path)


def test_duplicate_yaml_key_names_line_and_key(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("model: m\nbeta: 0.1\ndataset: d\nbeta: 0.2\n")
    with pytest.raises(ConfigError, match=rf"^{path}: line 4: invalid YAML \(duplicate key "
                       r"'beta', first on line 2\)$"):
        load_config(DPOConfig, path)


def test_error_quotes_at_most_200_characters_of_a_value(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("batch_size: [" + ", ".join(["1"] * 10_000) + "]\n")
    with pytest.raises(ConfigError) as info:
        load_config(DPOConfig, path)
    message = str(info.value)
    assert message == f"{path}: batch_size: expected an int, got [" + "1, " * 65 + "1..."
    assert len(message) < len(str(path)) + 240


@pytest.mark.parametrize("seed", [-1, 2**32, 10**40])
def test_seed_must_fit_32_bits(seed):
    with pytest.raises(ConfigError, match=rf"^seed: expected an int in \[0, 4294967295\], "
                       rf"got {seed}$"):
        parse_config(DPOConfig, ["model=m", "dataset=d", f"seed={seed}"])
    assert parse_config(DPOConfig, ["model=m", "dataset=d", f"seed={2**32 - 1}"]).seed == 2**32 - 1
