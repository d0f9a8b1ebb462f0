"""LoRA adapters through PEFT: wrap the policy, view its reference, export.

With ``lora=true`` only the adapter weights train. The reference is the same base model with
the adapters bypassed (``reference_view``), so DPO keeps one copy of the weights in memory.
PEFT initialises LoRA's B matrices to zero, so at step 0 policy and reference agree exactly and
the first DPO loss is ln 2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import ConfigError, TrainConfig


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("lora: needs the 'peft' package (pip install 'preftune[lora]')") from None
    return peft


def apply_lora(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """``model`` wrapped as a PEFT model whose only trainable weights are LoRA adapters."""
    peft = _peft()
    names = [n.strip() for n in cfg.lora_target_modules.split(",") if n.strip()]
    targets: str | list[str] = "all-linear" if names == ["all-linear"] else names
    config = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                             lora_dropout=cfg.lora_dropout, target_modules=targets,
                             bias="none", task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module name that matches nothing
        raise ConfigError(f"lora_target_modules: {' '.join(str(e).split())}") from None


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (its linear layers carry the adapters)."""
    return model.get_base_model() if is_lora(model) else model


@contextlib.contextmanager
def reference_view(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block, ``model`` computes as its base model: the LoRA reference."""
    if not is_lora(model):
        yield model
        return
    with model.disable_adapter():
        yield model


def export_adapter(model: torch.nn.Module, folder: Path) -> None:
    """Write the adapter alone (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    model.save_pretrained(folder)


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The base model with the adapters folded into its weights (modifies ``model``)."""
    return model.merge_and_unload()
