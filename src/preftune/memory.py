"""Process memory between the phases of a training step.

On CPU, tensors live in the C library's heap. glibc keeps the pages of freed blocks resident
inside the heap, and the blocks a forward frees (recomputed activations, chunk logits) are
rarely the sizes the following backward asks for (gradients), so the resident set grows past
the live tensors by a few hundred MB. ``malloc_trim(0)`` hands every free page inside the heap
back to the OS; whatever a later phase touches again is faulted back in, which costs far less
than the step. Values are untouched.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable

__all__ = ["memory_releaser", "release_free_memory"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; musl and others have none
    except (AttributeError, OSError):
        return None


def release_free_memory() -> bool:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim(0)``); False if none."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def memory_releaser(enabled: bool, device: object) -> Callable[[], object]:
    """What a training step calls between its phases: :func:`release_free_memory` when
    ``enabled`` and the tensors live in host memory (``device`` is CPU), else a no-op."""
    if enabled and str(getattr(device, "type", device)) == "cpu":
        return release_free_memory
    return lambda: None
