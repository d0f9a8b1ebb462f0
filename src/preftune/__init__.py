"""preftune: SFT and preference fine-tuning (DPO and related losses) of causal language models.

From Python::

    from preftune import DPOConfig, train
    run = train(DPOConfig(model="path/to/model", dataset=rows, max_steps=20))

``train`` returns the run folder. Configs take the keys of ``preftune dpo --help``; ``model`` may
also be a loaded ``PreTrainedModel`` (with ``tokenizer=`` its tokenizer) and ``dataset`` a list
of dicts or a ``datasets.Dataset``. The preference losses and their options are listed in
:mod:`preftune.losses`, which imports on its own.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["DPOConfig", "SFTConfig", "TrainConfig", "__version__", "train"]


def __getattr__(name: str) -> Any:  # PEP 562: `preftune --help` and the data CLI stay light
    if name in ("DPOConfig", "SFTConfig", "TrainConfig"):
        return getattr(importlib.import_module("preftune.config"), name)
    if name == "train":  # the module, callable as its train function (see preftune.train)
        return importlib.import_module("preftune.train")
    raise AttributeError(f"module 'preftune' has no attribute {name!r}")
