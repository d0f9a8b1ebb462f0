"""preftune: SFT and preference fine-tuning (DPO and related losses) of causal language models.

The preference losses and their options are listed in :mod:`preftune.losses`.
"""

__version__ = "0.1.0"
