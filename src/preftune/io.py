"""File safety shared by every writer and log reader: atomic, durable file and folder
replacement, and one JSON-lines reader.

A file or folder is always built under a temporary name beside its target, fsynced, and renamed
into place, then the parent folder is fsynced: a crash or power loss leaves the old state or
the whole new one, never a half-written target. Temporary names start with a dot; callers whose
leftovers are cleaned up by name pass that name in.

This module imports only the standard library.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class JsonlError(ValueError):
    """A bad line of a JSON-lines file (when the caller gives no error of its own)."""


def fsync_path(path: Path) -> None:
    """fsync one file or folder by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder``, then ``folder`` itself."""
    for path in folder.rglob("*"):
        if not path.is_symlink():
            fsync_path(path)
    fsync_path(folder)


def sibling(target: Path, kind: str) -> Path:
    """A fresh hidden name beside ``target``: ``.NAME.XXXXXXXX.KIND`` (8 hex digits)."""
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}.{kind}")


def atomic_write(path: Path, write: Callable[[Path], object], *, tmp: Path | None = None) -> None:
    """Replace ``path`` with what ``write(tmp)`` writes into the file ``tmp``, atomically and
    durably. ``tmp`` defaults to a fresh ``.NAME.XXXXXXXX.tmp`` beside ``path``, created empty
    with the umask's permissions. On any failure ``tmp`` is removed and ``path`` is untouched."""
    if tmp is None:
        tmp = sibling(path, "tmp")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_path(path.parent)


def publish_dir(new: Path, target: Path, *, old: Path | None = None) -> None:
    """Rename the finished folder ``new`` to ``target`` after fsyncing everything in it.

    An existing ``target`` is first renamed to ``old`` (default: a fresh ``.NAME.XXXXXXXX.old``
    beside it) and deleted once ``new`` is in place, so a crash in between leaves the previous
    folder complete under ``old``. ``new`` is left where it is if this fails."""
    fsync_tree(new)
    if target.exists() or target.is_symlink():
        old = old or sibling(target, "old")
        os.replace(target, old)
        os.replace(new, target)
        fsync_path(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
        fsync_path(target.parent)


@contextlib.contextmanager
def building_dir(target: Path, *, tmp: Path | None = None,
                 old: Path | None = None) -> Iterator[Path]:
    """Yield a new empty folder (``tmp``, default ``.NAME.XXXXXXXX.partial`` beside ``target``)
    to fill; on a normal exit it replaces ``target`` (see :func:`publish_dir`), on any error
    it is removed and ``target`` is untouched."""
    tmp = tmp or sibling(target, "partial")
    tmp.mkdir()
    try:
        yield tmp
        publish_dir(tmp, target, old=old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def json_problem(error: Exception) -> str:
    """What is wrong with a line that failed to decode or parse, in a few words."""
    if isinstance(error, RecursionError):
        return "invalid JSON: nested too deeply"
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 ({error.reason})"
    if isinstance(error, json.JSONDecodeError):
        return f"invalid JSON: {error.msg} (column {error.colno})"
    # an integer of more than 4300 digits: Python's message up to its advice
    return f"invalid JSON: {str(error).split(';')[0][:100]}"


def iter_jsonl(path: Path, *, lenient: bool = False,
               error: Callable[[int, str], Exception] | None = None,
               on_cut: Callable[[int], None] | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of ``path``, in order.

    Lines end at "\\n" only: str.splitlines would also break inside a string at U+2028 or
    U+0085, which JSON writers leave raw. A line that is not UTF-8 JSON raises
    ``error(line, problem)`` (default :class:`JsonlError` ``path:line: problem``). In
    ``lenient`` mode a last line without its newline that does not parse is a write cut short
    by a crash: it is skipped and reported to ``on_cut``. OSError from reading propagates."""
    chunks = path.read_bytes().split(b"\n")
    for number, chunk in enumerate(chunks, 1):
        if not chunk.strip():
            continue
        try:
            value = json.loads(chunk.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            if lenient and number == len(chunks):
                if on_cut is not None:
                    on_cut(number)
                return
            problem = json_problem(e)
            raise (error(number, problem) if error else
                   JsonlError(f"{path}:{number}: {problem}")) from None
        yield number, value
