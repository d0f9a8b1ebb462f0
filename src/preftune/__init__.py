"""preftune: preference fine-tuning (DPO, conservative DPO, IPO) of causal language models."""

__version__ = "0.1.0"
