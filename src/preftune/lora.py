"""LoRA adapters through PEFT: wrap the policy, view its reference, export.

With ``lora=true`` only the adapter weights train. The reference is the same base model with
the adapters bypassed (``reference_view``), so DPO keeps one copy of the weights in memory.
PEFT initialises LoRA's B matrices to zero, so at step 0 policy and reference agree exactly and
the first DPO loss is ln 2.
"""

from __future__ import annotations

import contextlib

import torch

from .config import ConfigError, TrainConfig


def apply_lora(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """``model`` wrapped as a PEFT model whose only trainable weights are LoRA adapters."""
    try:
        import peft
    except ImportError:
        raise ConfigError("lora: needs the 'peft' package (pip install 'preftune[lora]')") from None
    names = [n.strip() for n in cfg.lora_target_modules.split(",") if n.strip()]
    targets: str | list[str] = "all-linear" if names == ["all-linear"] else names
    config = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                             lora_dropout=cfg.lora_dropout, target_modules=targets,
                             bias="none", task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module name that matches nothing
        raise ConfigError(f"lora_target_modules: {' '.join(str(e).split())}") from None


def reference_view(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Inside the block, ``model`` computes as its base model (adapters bypassed): the LoRA
    reference. A model without adapters is left as it is."""
    if hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return contextlib.nullcontext()


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The base model with the adapters folded into its weights (modifies ``model``)."""
    return model.merge_and_unload()
