"""Preference data: reading pairs (formats), tokenizing them (tokenize), batching (collate).

The collate functions (which need torch) load on first use, so `preftune data` answers fast.
"""

from typing import TYPE_CHECKING

from preftune.data.formats import (
    FORMATS,
    DataError,
    Message,
    PreferencePair,
    SkipReport,
    detect_format,
    load_pairs,
    read_pairs,
    split_shared_prompt,
)
from preftune.data.tokenize import (
    Truncation,
    default_truncation,
    render_chat,
    tokenize_pair,
    tokenize_sft,
)

if TYPE_CHECKING:
    from preftune.data.collate import collate_pairs, collate_sft, pad_id_for

_LAZY = {"collate_pairs", "collate_sft", "pad_id_for"}


def __getattr__(name: str):  # PEP 562
    if name in _LAZY:
        from preftune.data import collate

        return getattr(collate, name)
    raise AttributeError(f"module 'preftune.data' has no attribute {name!r}")


__all__ = [
    "FORMATS",
    "DataError",
    "Message",
    "PreferencePair",
    "SkipReport",
    "Truncation",
    "collate_pairs",
    "collate_sft",
    "default_truncation",
    "detect_format",
    "load_pairs",
    "pad_id_for",
    "read_pairs",
    "render_chat",
    "split_shared_prompt",
    "tokenize_pair",
    "tokenize_sft",
]
