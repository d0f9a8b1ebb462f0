"""Typed per-stage configuration: an optional YAML file plus ``key=value`` overrides.

Everything is validated before any model or data is touched, and every problem is
reported as a one-line :class:`ConfigError`. Defaults follow the DPO paper and its
reference implementation (eric-mitchell/direct-preference-optimization, config.yaml);
each deviation says why in its help text. Stdlib + PyYAML only, so it is cheap to import.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from .data.formats import FORMATS, DatasetFormat

DATASET_FORMATS = FORMATS
C = TypeVar("C", bound="TrainConfig")
# help/dump sections, in order
GROUPS = {"model": "model", "data": "data", "loss": "loss", "opt": "optimization",
          "eval": "evaluation & output", "run": "runtime"}
_CHECKS = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 0.5)": lambda v: 0 <= v < 0.5,
           "in [0, 1)": lambda v: 0 <= v < 1,
           # 32 bits, as numpy takes: batch_order's seed * 100_003 + epoch fits torch's 64
           "in [0, 4294967295]": lambda v: 0 <= v < 2**32}
REPORT_TO: tuple[str, ...] = ("tensorboard", "wandb")
# The help of a field that is a registered loss option: the registry (preftune.losses) has it.
LOSS_OPTION = "(see preftune.losses.OPTIONS)"
DEFAULT_MICRO_BATCH = 8  # micro_batch_size when unset (at most batch_size)


class ConfigError(ValueError):
    """One line, user-facing."""


# Keys the Python API may also set to objects: a loaded PreTrainedModel (model, reference), a
# tokenizer, and rows (dataset, eval_dataset: a list of dicts or a datasets.Dataset).
IN_MEMORY = ("model", "reference", "tokenizer", "dataset", "eval_dataset")


def in_memory(value: Any) -> bool:
    """Whether a config value is an object given through the Python API, not a name."""
    return value is not None and not isinstance(value, str | bool | int | float | dict)


def _rows(value: Any) -> bool:
    return isinstance(value, list | tuple) or hasattr(value, "column_names")  # datasets.Dataset


_IN_MEMORY_KINDS = {"model": ("a loaded model", lambda v: hasattr(v, "parameters")),
                    "reference": ("a loaded model", lambda v: hasattr(v, "parameters")),
                    "tokenizer": ("a tokenizer", lambda v: hasattr(v, "apply_chat_template")),
                    "dataset": ("a list of dicts or a datasets.Dataset", _rows),
                    "eval_dataset": ("a list of dicts or a datasets.Dataset", _rows)}


def _check_in_memory(name: str, value: Any) -> None:
    kind, fits = _IN_MEMORY_KINDS[name]
    if not fits(value):
        raise ConfigError(f"{name}: expected a string or {kind}, got {type(value).__name__}")


def describe(value: Any) -> Any:
    """A config value as config.yaml and the run's log show it: objects as a short text
    (``<list of 200 rows>``, ``<LlamaForCausalLM object>``), anything else as it is."""
    if not in_memory(value):
        return value
    if _rows(value):
        return f"<{type(value).__name__} of {len(value)} rows>"
    return f"<{type(value).__name__} object>"


# Characters that would end or redraw a terminal line: C0/C1 controls, U+2028, U+2029.
_LINE_BREAKING = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """``text`` with every control character escaped as Python writes it (``\\n``, ``\\x1b``),
    so that a quoted field name or value can never start a line of its own."""
    def escape(match: re.Match[str]) -> str:
        return repr(match.group())[1:-1]

    return _LINE_BREAKING.sub(escape, text)


def option(group: str, default: Any, help: str, check: str | None = None,
           required: str = "") -> Any:
    """A key of a config dataclass: its group and help line for ``--help``, its default, and
    ``check``, the name of a rule in ``_CHECKS``; ``required`` keys have no default. Commands
    with keys of their own (``eval``, ``pairs``) declare them with it too."""
    meta = {"help": help, "group": group, "check": check}
    if required:
        return dataclasses.field(metadata={**meta, "required": required})
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_f = option  # short, for the many declarations below


def coerce_fields(cfg: Any) -> None:
    """Check every key of a config dataclass against its annotation and check rule, in place
    (normalised values; the first bad key raises a one-line ``ConfigError``)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, _coerce(f, hints[f.name], getattr(cfg, f.name)))


@dataclass
class TrainConfig:
    """Keys shared by every stage."""

    model: str = _f("model", None, "policy to train: local HF folder, hub id, or alias (e.g. "
                    "smollm2-135m-instruct)", required="a local Hugging Face folder, a hub id, "
                    "or an alias")
    dataset: str = _f("data", None, "local file (jsonl, jsonl.gz, json, parquet, csv) or hub "
                      "dataset name[:split]", required="a local file or a hub dataset name")
    tokenizer: str | None = _f("model", None, "tokenizer; null = same as model")
    dataset_format: DatasetFormat | None = _f("data", None, "row format; null = detect")
    eval_dataset: str | None = _f("data", None, "null = held-out slice of dataset")
    eval_examples: int = _f("data", 256, "eval rows (held out from dataset if needed)", ">= 0")
    max_examples: int | None = _f("data", None, "use only the first N training rows (after "
                                  "the held-out slice); null = all", "> 0")
    max_length: int = _f("data", 512, "max tokens of prompt + response", "> 0")
    max_prompt_length: int = _f("data", 256, "max prompt tokens; must be < max_length", "> 0")
    truncation: Literal["auto", "keep_end", "keep_start"] = _f(
        "data", "auto", "prompt truncation; auto = keep_end for hh and chat messages, keep_start "
        "otherwise")
    strict_data: bool = _f("data", False, "stop at the first bad row, not skip and report")
    prompt_field: str | None = _f("data", None, "the field holding the prompt, when not named "
                                  "prompt (read as if it were)")
    chosen_field: str | None = _f("data", None, "the field holding the preferred response "
                                  "(SFT: the target), when not named chosen")
    rejected_field: str | None = _f("data", None, "the field holding the dispreferred "
                                    "response, when not named rejected")
    messages_field: str | None = _f("data", None, "the field holding the prompt's message "
                                    "list, when not named conversations (ShareGPT)")
    lr: float = _f("opt", 5e-7, "peak learning rate (the reference uses it for SFT too)", "> 0")
    optimizer: Literal["rmsprop", "adamw"] = _f("opt", "rmsprop", "reference: RMSprop "
                                                "(about as good as Adam, less memory)")
    weight_decay: float = _f("opt", 0.0, "decoupled weight decay", ">= 0")
    warmup_steps: int | None = _f("opt", None, "linear warmup steps; null = the paper's 150, "
                                  "at most a tenth of the run's steps", ">= 0")
    scheduler: Literal["constant", "linear", "cosine"] = _f(
        "opt", "constant", "schedule after warmup (reference: constant)")
    batch_size: int = _f("opt", 64, "pairs (SFT: examples) per optimizer step, as the paper",
                         "> 0")
    micro_batch_size: int | None = _f("opt", None, "per forward pass; null = min(8, "
                                      "batch_size): the reference does not accumulate, 8 "
                                      "bounds memory on one device, same result", "> 0")
    epochs: int = _f("opt", 1, "passes over the training data", "> 0")
    max_steps: int | None = _f("opt", None, "stop after N optimizer steps; null = all epochs",
                               "> 0")
    max_grad_norm: float = _f("opt", 10.0, "gradient clipping norm", "> 0")
    seed: int = _f("opt", 0, "random seed (data order, sampling)", "in [0, 4294967295]")
    output_dir: str | None = _f("eval", None, "null = runs/<stage>-<YYYYmmdd-HHMMSS>")
    eval_every: int = _f("eval", 300, "eval + save every N steps, 0 = only at the end "
                         "(reference: 20,000 examples ~ 312 steps of 64)", ">= 0")
    sample_every: int | None = _f("eval", None, "sample every N steps, 0 = only at the end; "
                                  "null = eval_every", ">= 0")
    n_samples: int = _f("eval", 4, "prompts sampled each time, 0 = off (reference: 16; "
                        "fewer keeps small runs fast)", ">= 0")
    max_new_tokens: int = _f("eval", 128, "max tokens per sample", "> 0")
    eval_scorer: str | None = _f("eval", None, "at each eval also sample 4 completions of the "
                                 "n_samples prompts from policy and reference, judged by this "
                                 "scorer (vader, reward_model:PATH, python:MODULE:FUNCTION): "
                                 "win rate, scores, KL (preftune eval); null = off")
    log_every: int = _f("eval", 1, "log metrics every N steps", "> 0")
    save_every: int | None = _f("eval", None, "checkpoint every N steps and at the end, 0 = "
                                "only at the end; null = eval_every", ">= 0")
    keep_checkpoints: int = _f("eval", 2, "keep the last N checkpoints", "> 0")
    resume: str | None = _f("run", None, "true (or latest) = continue from the latest "
                            "checkpoint in output_dir (fresh start if none), or a checkpoint "
                            "folder; false/no/off/none = start afresh")
    max_nonfinite_steps: int = _f("run", 3, "stop after N non-finite steps in a row (each "
                                  "one's update is skipped)", "> 0")
    device: Literal["auto", "cpu", "cuda"] = _f("run", "auto", "auto = cuda if available")
    dtype: Literal["float32", "bfloat16"] = _f(
        "run", "float32", "compute precision (reference: float32); bfloat16 = bf16 matmuls "
        "(torch.autocast; under torchrun FSDP2 gathers bf16 copies of the weights) with "
        "float32 master weights, gradients and optimizer state, for 1 or N processes")
    master_weights: Literal["float32", "bfloat16"] = _f(
        "run", "float32", "with dtype=bfloat16, the weights the optimizer updates (and its "
        "state); bfloat16 = pure bf16, half their memory, but bf16 keeps 8 significant bits: "
        "an update below about 2^-8 x |w| rounds away, so a warning when lr < 2^-8 x the mean "
        "|w| of the trainable weights (Adam/RMSprop updates are about lr in size)")
    reduce_dtype: Literal["float32", "bfloat16"] = _f(
        "run", "float32", "torchrun: dtype gradients are reduce-scattered in across processes; "
        "bfloat16 (with dtype=bfloat16) halves that traffic and rounds the summed gradients")
    reduce_every_micro_batch: bool = _f(
        "run", False, "torchrun: reduce-scatter gradients after every micro-batch instead of "
        "once per optimizer step: more communication, but no unsharded gradients of the whole "
        "model kept on each process between micro-batches (less memory)")
    gradient_checkpointing: bool = _f("run", True, "recompute each block's activations in "
                                      "backward: one block's activation memory, for more compute")
    release_memory: bool = _f("run", True, "CPU: return freed heap pages to the OS before "
                              "each backward and optimizer step (glibc malloc_trim; values "
                              "unchanged; a lower peak, for the time to fault pages back in)")
    compile: bool = _f("run", False, "torch.compile the norms and MLP of each transformer "
                       "block of the policy (GPU; first steps pay the compilation)")
    trust_remote_code: bool = _f("run", False, "allow model code from the hub")
    report_to: str = _f("eval", "none", "extra metric sinks besides metrics.jsonl, comma-"
                        "separated: tensorboard, wandb (W&B honours WANDB_MODE=offline); none")
    lora: bool = _f("model", False, "train LoRA adapters (PEFT) instead of all weights; the "
                    "reference is the base model with adapters disabled")
    lora_r: int = _f("model", 8, "LoRA rank", "> 0")
    lora_alpha: float = _f("model", 16.0, "LoRA scaling numerator (scale = alpha / r)", "> 0")
    lora_dropout: float = _f("model", 0.0, "dropout on the LoRA input", "in [0, 1)")
    lora_target_modules: str = _f("model", "all-linear", "comma-separated module names, or "
                                  "all-linear (every linear layer but the output layer)")
    lora_export: Literal["merged", "adapter"] = _f("model", "merged", "final/: adapters "
                                                   "merged into full weights, or the adapter")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):  # the Python API may pass paths
                value = os.fspath(value)
            if f.name in IN_MEMORY and in_memory(value):
                _check_in_memory(f.name, value)  # a loaded model, tokenizer or rows (Python
                continue  # API): used as given
            setattr(self, f.name, _coerce(f, hints[f.name], value))
        self.resume = _resume_choice(self.resume)
        if self.micro_batch_size is None:  # unset: follows a batch_size below the default 8
            self.micro_batch_size = min(DEFAULT_MICRO_BATCH, self.batch_size)
        self._check()

    def _check(self) -> None:
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"max_prompt_length: must be < max_length ({self.max_length}), "
                              f"got {self.max_prompt_length}")
        if self.micro_batch_size > self.batch_size:
            raise ConfigError(f"micro_batch_size: must be <= batch_size ({self.batch_size}), "
                              f"got {self.micro_batch_size}")
        for key in ("master_weights", "reduce_dtype"):
            if getattr(self, key) == "bfloat16" and self.dtype != "bfloat16":
                raise ConfigError(f"{key}: bfloat16 applies only with dtype=bfloat16, got "
                                  f"dtype={self.dtype}")
        for sink in self.report_sinks():
            if sink not in REPORT_TO:
                raise ConfigError(f"report_to: unknown sink {sink!r}; expected a comma-"
                                  f"separated list of {', '.join(REPORT_TO)}, or none")

    def field_map(self) -> dict[str, str]:
        """{name a format reads: name in the data} for the fields the data names otherwise."""
        given = {"prompt": self.prompt_field, "chosen": self.chosen_field,
                 "rejected": self.rejected_field, "conversations": self.messages_field}
        return {name: field for name, field in given.items() if field is not None}

    def report_sinks(self) -> list[str]:
        """report_to as a list of names ([] for none)."""
        names = [n.strip().lower() for n in self.report_to.split(",") if n.strip()]
        return [] if names == ["none"] else names


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on the chosen responses."""


@dataclass
class DPOConfig(TrainConfig):
    """Preference optimisation with a loss from ``preftune.losses`` (DPO by default)."""

    reference: str | None = _f("model", None, "frozen reference; null = same as model")
    loss: str = _f("loss", "dpo", "preference loss: a name registered in preftune.losses, or "
                   "several separated by commas, summed (dpo,bco_pair,sft)")
    loss_weights: str | None = _f("loss", None, "weights of the losses in loss, "
                                  "comma-separated (0.8,0.2,1.0); null = 1 each")
    divergence: Literal["reverse_kl", "forward_kl", "js", "alpha"] = _f(
        "loss", "reverse_kl", "f-divergence toward the reference (f-DPO): maps each log-ratio "
        "before the loss; reverse_kl = DPO")
    divergence_alpha: float = _f("loss", 0.5, "alpha of divergence=alpha, in (0, 1)")
    ld_alpha: float | None = _f("loss", None, "LD-DPO: weight in [0, 1] of the tokens of the "
                                "longer response beyond the shorter one's length; null = off")
    wpo: bool = _f("loss", False, "WPO: weight each pair by its length-normalised policy "
                   "probability (detached)")
    sync_reference: Literal["none", "soft", "hard"] = _f(
        "loss", "none", "TR-DPO: update the reference from the policy every sync_every steps "
        "(soft: mix in sync_alpha of the policy; hard: copy it)")
    sync_alpha: float = _f("loss", 0.6, "TR-DPO soft update: share of the policy, in [0, 1]")
    sync_every: int = _f("loss", 512, "TR-DPO: optimizer steps between reference updates",
                         "> 0")
    beta: float = _f("loss", 0.1, "strength of the KL penalty toward the reference", "> 0")
    # Options of the registered losses (preftune.losses.OPTIONS): default, help and valid
    # values come from the registry. These two have keys of their own; any other registered
    # option is a key too (`my_option=0.3`), kept in loss_options.
    label_smoothing: float = _f("loss", 0.0, LOSS_OPTION)
    simpo_gamma: float = _f("loss", 0.5, LOSS_OPTION)
    loss_options: dict = _f("loss", {}, "values of other registered loss options, "
                            "{name: value}; set each as its own key (name=value)")
    rpo_alpha: float = _f("loss", 0.0, "weight of a per-token NLL term on the chosen response "
                          "added to any loss (RPO); 0 = off", ">= 0")
    reference_free: bool = _f("loss", False, "ignore the reference (uniform reference)")
    logps: Literal["sum", "mean"] = _f("loss", "sum", "sequence log-prob: sum or token mean")
    precompute_reference: bool = _f("run", True, "reference log-probs computed once before "
                                    "training and cached on disk; the reference is then freed")
    chunked_logps: bool = _f("run", True, "log-probs through the output layer in chunks, only "
                             "at response tokens: no [batch, length, vocab] logits (exact)")
    chunk_size: int = _f("run", 256, "tokens per output-layer chunk", "> 0")
    share_prompt: bool = _f("run", True, "run each pair's prompt once: [prompt, chosen, "
                            "rejected] with a mask that hides chosen from rejected (exact)")
    pack: bool = _f("run", True, "pack pairs into rows so padding costs nothing (exact)")
    segment_attention: bool = _f("run", True, "with share_prompt/pack and sdpa attention: two "
                                 "causal attention calls per pair instead of one masked call "
                                 "per row, and one row per micro-batch (exact)")
    attention_kernel: Literal["auto", "segment", "flex"] = _f(
        "run", "auto", "segment attention's kernel: flex = one FlexAttention call per layer "
        "for the whole micro-batch, with a block-sparse mask built once per micro-batch (CUDA "
        "only: no backward on CPU); segment = the per-pair calls (the exact CPU path); auto = "
        "flex on CUDA, segment elsewhere")
    keep_activations: bool = _f("run", True, "with chunked_logps: before a step's first "
                                "backward, keep the output layer's logits and the last blocks' "
                                "activations in the memory its gradients will take, instead of "
                                "recomputing them in backward (exact; peak about unchanged)")

    def _check(self) -> None:
        super()._check()
        from . import losses  # the registry (needs torch): only when a dpo config is built

        self.loss = ",".join(n.lower() if n not in losses.LOSSES and n.lower() in losses.LOSSES
                             else n for n in losses.loss_names(self.loss))
        for name in self.loss_options:
            if name not in losses.OPTIONS or not losses.OPTIONS[name].config:
                raise _unknown(name, type(self))
        try:
            losses.check_losses(self.loss, self.beta, self.loss_values())
        except losses.UnknownLoss:
            raise ConfigError(f"loss: expected one of {', '.join(losses.LOSSES)}, got "
                              f"{show(self.loss)}") from None
        except losses.InvalidOption as e:
            raise ConfigError(f"{e.option.name}: expected a float {e.option.expect}, got "
                              f"{show(e.value)}") from None
        except losses.MisplacedOption as e:
            raise ConfigError(f"{e.name}: only applies to loss={' or '.join(e.users)}, got "
                              f"loss={self.loss}") from None
        except ValueError as e:  # a loss listed twice, or two with state
            raise ConfigError(f"loss: {e}") from None
        self._check_loss_extras(losses)
        if self.attention_kernel == "flex":
            self._check_flex()

    def _check_flex(self) -> None:
        if not self.segment_attention:
            raise ConfigError("attention_kernel: flex is segment attention's kernel; it needs "
                              "segment_attention=true")
        import torch

        if self.device == "cpu" or not torch.cuda.is_available():
            raise ConfigError("attention_kernel: flex needs a CUDA device (FlexAttention has no "
                              "backward on CPU); use auto or segment")

    def weights(self) -> tuple[float, ...] | None:
        """``loss_weights`` as numbers (None when empty); ConfigError if malformed."""
        if self.loss_weights is None:
            return None
        try:
            weights = tuple(float(w) for w in self.loss_weights.split(","))
        except ValueError:
            raise ConfigError(f"loss_weights: expected comma-separated numbers, got "
                              f"{show(self.loss_weights)}") from None
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ConfigError(f"loss_weights: expected finite numbers >= 0, got "
                              f"{show(self.loss_weights)}")
        return weights

    def _check_loss_extras(self, losses: types.ModuleType) -> None:
        """The loss weights, divergence, LD-DPO, WPO and TR-DPO settings, and how they meet
        logps, reference_free and lora."""
        names, weights = losses.loss_names(self.loss), self.weights()
        if weights is not None and len(weights) != len(names):
            raise ConfigError(f"loss_weights: {len(weights)} weights for the {len(names)} "
                              f"losses of loss={self.loss}")
        specs = [losses.LOSSES[n] for n in names]
        referenced = not self.reference_free and any(s.needs_reference for s in specs)
        if self.divergence != "reverse_kl":
            if not referenced:
                raise ConfigError(f"divergence: {self.divergence} scores log-ratios to a "
                                  "reference; this loss has none (reference_free or loss)")
            if not any(s.inputs != "logps" and s.needs_reference for s in specs):
                raise ConfigError(f"divergence: loss={self.loss} does not use log-ratios")
        if not (0 < self.divergence_alpha < 1):
            raise ConfigError(f"divergence_alpha: expected a float in (0, 1), got "
                              f"{show(self.divergence_alpha)}")
        if self.divergence_alpha != 0.5 and self.divergence != "alpha":
            raise ConfigError("divergence_alpha: only applies to divergence=alpha, got "
                              f"divergence={self.divergence}")
        if self.ld_alpha is not None:
            if not 0 <= self.ld_alpha <= 1:
                raise ConfigError(f"ld_alpha: expected a float in [0, 1], got "
                                  f"{show(self.ld_alpha)}")
            if self.logps == "mean" or any(s.length_normalized for s in specs):
                why = ("logps=mean" if self.logps == "mean"
                       else f"loss={self.loss} (per-token means)")
                raise ConfigError(f"ld_alpha: LD-DPO reweights summed log-probs; not with {why}")
            if self.wpo:
                raise ConfigError("ld_alpha: not with wpo=true (WPO weights use the plain "
                                  "per-token mean log-probs)")
        if self.sync_reference != "none":
            if not referenced:
                raise ConfigError("sync_reference: TR-DPO updates a reference; this loss has "
                                  "none (reference_free or loss)")
            if self.lora:
                raise ConfigError("sync_reference: TR-DPO needs a reference model of its own; "
                                  "with lora=true the reference is the adapters-off policy")
        if not 0 <= self.sync_alpha <= 1:
            raise ConfigError(f"sync_alpha: expected a float in [0, 1], got "
                              f"{show(self.sync_alpha)}")

    def loss_values(self) -> dict[str, float]:
        """Every registered loss option set here: the two with keys of their own and
        ``loss_options``."""
        return {"label_smoothing": self.label_smoothing, "simpo_gamma": self.simpo_gamma,
                **self.loss_options}


_STAGES: dict[str, type[TrainConfig]] = {"sft": SFTConfig, "dpo": DPOConfig}


def stage_config(stage: str) -> type[TrainConfig]:
    """The config class of a stage ("sft" or "dpo")."""
    if stage not in _STAGES:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {', '.join(_STAGES)}")
    return _STAGES[stage]


def _split_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _coerce(f: dataclasses.Field, tp: Any, v: Any) -> Any:
    """Check one value against its annotation and `check`; returns the normalised value."""
    tp, optional = _split_optional(tp)
    if v is None and optional:
        return None
    if v is None and "required" in f.metadata:
        raise ConfigError(f"{f.name}: required ({f.metadata['required']})")
    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        if isinstance(v, str) and v.lower() in choices:
            return v.lower()
        raise ConfigError(f"{f.name}: expected one of {', '.join(choices)}, got {show(v)}")
    if tp is dict:  # loss_options: {name: number}; names and ranges are the registry's
        if isinstance(v, Mapping) and all(isinstance(k, str) for k in v):
            return {k: _coerce(dataclasses.field(metadata={"check": None}), float, x)
                    for k, x in v.items()}
        raise ConfigError(f"{f.name}: expected a mapping of option name to number, got "
                          f"{show(v)}")
    want = {bool: "true or false", int: "an int", float: "a float", str: "a string"}[tp]
    out = v if isinstance(v, tp) and not (tp is not bool and isinstance(v, bool)) else None
    if tp is str and isinstance(v, bool):  # `resume: true` in YAML reads as a bool
        out = show(v)
    if tp is float and not isinstance(v, bool):
        try:  # PyYAML reads 1e-6 (no dot) as a string; accept it for float keys
            out = float(v) if math.isfinite(float(v)) else None
        except (TypeError, ValueError):
            out = None
    check = f.metadata["check"]
    if out is not None and check and not _CHECKS[check](out):
        out, want = None, f"{want} {check}"
    if out is None:
        raise ConfigError(f"{f.name}: expected {want}, got {show(v)}")
    return out


def _resume_choice(value: str | None) -> str | None:
    """``resume`` as the run reads it: None (start afresh), "true" (latest) or a folder.
    Boolean words are never folder names here; spell a folder so named as ./no."""
    word = value.strip().lower() if value is not None else None
    if word in (None, "false", "no", "off", "none", "null", ""):
        return None
    return "true" if word in ("true", "yes", "on", "latest") else value


def show(v: Any, limit: int = 200) -> str:
    """null/true/false as YAML spells them, anything else as repr (strings quoted), cut to
    about ``limit`` characters: an error message quotes a value, never all of a huge one."""
    text = "null" if v is None else str(v).lower() if isinstance(v, bool) else repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fields(cls: type) -> list[dataclasses.Field]:
    """Fields in help/dump order: by group, then declaration order."""
    return sorted(dataclasses.fields(cls), key=lambda f: list(GROUPS).index(f.metadata["group"]))


def _unknown(key: str, cls: type) -> ConfigError:
    close = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(cls)], n=1)
    hint = f"did you mean {close[0]!r}?" if close else "see --help for the keys"
    other = [s for s, c in _STAGES.items() if key in {f.name for f in dataclasses.fields(c)}]
    if other:
        hint = f"it applies only to the {other[0]} stage"
    return ConfigError(f"unknown key {show(key, 100)}; {hint}")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors/aliases and duplicate mapping keys.

    A config has no use for aliases, and they let a few hundred bytes stand for billions of
    values (the "billion laughs"); a duplicate key would silently override the first one."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if event.anchor is not None:  # an &anchor on a node, or a *alias to one
            raise yaml.composer.ComposerError(
                None, None, f"anchor or alias {show(event.anchor, 40)}: anchors and aliases "
                "are not allowed in a config", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class says so
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {show(key, 100)}, first on line {first}",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` without anchors, aliases or duplicate keys (see _StrictLoader)."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping file read strictly (``yaml_load``); any problem is one ConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    try:
        data = yaml_load(text)
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML (nested too deeply)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{path}:{where} invalid YAML ({what})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return {str(k): v for k, v in data.items()}


def load_config(cls: type[C], yaml_path: str | os.PathLike | None = None,
                overrides: Mapping[str, object] | None = None) -> C:
    """Build and validate `cls` from an optional YAML file; `overrides` win over the file."""
    from_file = read_yaml(yaml_path) if yaml_path is not None else {}
    values = {**from_file, **(overrides or {})}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if "loss_options" in fields:  # a registered loss option without a field of its own
        for key in [k for k in values if k not in fields and _is_loss_option(k)]:
            values["loss_options"] = {**(values.get("loss_options") or {}), key: values.pop(key)}
    hints = typing.get_type_hints(cls)
    for key, v in values.items():
        source = f"{yaml_path}: " if key in from_file and key not in (overrides or {}) else ""
        try:
            if key not in fields:
                raise _unknown(key, cls)
            _coerce(fields[key], hints[key], v)
        except ConfigError as e:
            raise ConfigError(f"{source}{e}") from None
    for f in fields.values():
        if "required" in f.metadata and values.get(f.name) is None:
            raise ConfigError(f"{f.name}: required ({f.metadata['required']})")
    return cls(**values)


def _is_loss_option(key: str) -> bool:
    from .losses import OPTIONS  # the registry needs torch: only for keys no field has

    return key in OPTIONS and OPTIONS[key].config


def parse_config(cls: type[C], args: Sequence[str]) -> C:
    """`args` like ["recipe.yaml", "beta=0.2", "model=./m"]: an optional YAML file first."""
    args = list(args)
    yaml_path = args.pop(0) if args and "=" not in args[0] else None
    hints = typing.get_type_hints(cls)
    overrides: dict[str, object] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        if not sep:
            raise ConfigError(f"unexpected argument {arg!r}; expected key=value (only the "
                              "first argument may be a YAML file)")
        key = key.strip()
        try:
            value = yaml_load(raw)
        except (yaml.YAMLError, RecursionError):
            value = raw
        if key in hints and _split_optional(hints[key])[0] is str and value is not None \
                and not isinstance(value, str):
            value = raw  # keep names like 010, 1.0 or true exactly as typed
        overrides[key] = value
    return load_config(cls, yaml_path, overrides)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain {key: value} in help order; what `dump_config` writes."""
    return {f.name: describe(getattr(cfg, f.name)) for f in _fields(type(cfg))}


def dump_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the fully resolved config as YAML that `load_config` reads back unchanged, less
    ``resume``: how a run was started is not part of it, and the file loads as a fresh run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# preftune {type(cfg).__name__}, fully resolved\n"
    values = {k: v for k, v in config_to_dict(cfg).items() if k != "resume"}
    path.write_text(header + yaml.safe_dump(values, sort_keys=False), encoding="utf-8")


def config_help(cls: type[TrainConfig]) -> str:
    """Every key with its type, default and meaning, in aligned columns grouped by topic; the
    loss names and options of a dpo config come from the loss registry."""
    hints = typing.get_type_hints(cls)
    registry = _loss_registry_rows(cls)
    rows: dict[str, list[tuple[str, ...]]] = {}
    for f in _fields(cls):
        tp, optional = _split_optional(hints[f.name])
        default = ("(required)" if "required" in f.metadata else "{}" if tp is dict
                   else show(f.default).strip("'"))
        kind, text = getattr(tp, "__name__", ""), f.metadata["help"]
        if typing.get_origin(tp) is Literal:
            kind, text = "choice", f"{text} [{', '.join(typing.get_args(tp))}]"
        row = registry.pop(f.name, None) or (f.name, kind + "|null" * optional, default, text)
        rows.setdefault(f.metadata["group"], []).append(row)
    rows.setdefault("loss", []).extend(registry.values())  # options without a field
    widths = [max(len(r[i]) for g in rows.values() for r in g) for i in range(3)]
    out = [f"{cls.__name__} keys (YAML file and/or key=value; key=value wins):"]
    for group, group_rows in rows.items():
        out.append(f"\n{GROUPS[group]}:")
        out += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[3]
                for r in group_rows]
    return "\n".join(out)


def _loss_registry_rows(cls: type[TrainConfig]) -> dict[str, tuple[str, ...]]:
    """Help rows of the `loss` key and of every registered loss option (dpo configs only)."""
    if "loss_options" not in {f.name for f in dataclasses.fields(cls)}:
        return {}
    from .losses import LOSSES, OPTIONS

    rows = {"loss": ("loss", "choice", "dpo", f"preference loss [{', '.join(LOSSES)}]")}
    for name, option in OPTIONS.items():
        users = [k for k, spec in LOSSES.items() if name in spec.options]
        if option.config:
            rows[name] = (name, "float", show(option.default),
                          f"{option.help} [{option.expect}; loss={', '.join(users) or '-'}]")
    return rows
