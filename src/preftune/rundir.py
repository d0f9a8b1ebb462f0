"""Who may write into a run folder: ownership (a marker file) and one writer at a time (a lock).

A run writes only into a folder that is new, empty, or was made by preftune: preftune puts
``.preftune-run`` in every folder it claims, so a folder of the user's own files is never
mixed with run files. The same file carries the lock: the training process holds an exclusive
``flock`` on it for the whole run and writes its pid and host into it, so a second process on
the same folder is refused with one line naming the holder. The operating system drops the
lock when the holder dies, even by SIGKILL, so a stale lock never blocks a resume.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from .config import ConfigError
from .tracking import warn

MARKER = ".preftune-run"
_SHOWN = 5  # names listed when a folder is refused


class RunDirLock:
    """The claim on one run folder; ``release`` (or leaving the ``with`` block) unlocks it.

    Made by :func:`claim_output_dir`. With ``hold=False`` (ranks other than 0) it does nothing.
    """

    def __init__(self, path: Path, fd: int | None, created: Path | None = None) -> None:
        self.path = path
        self._fd = fd
        self._created = created  # the topmost folder the claim made, if it made any

    def release(self, *, failed: bool = False) -> None:
        """Unlock. After a failure that left nothing but the marker, remove the marker too, so
        a run that wrote nothing leaves the folder as empty as it found it, and the folders
        the claim made, so that it leaves none behind."""
        if self._fd is None:
            return
        try:
            if failed and _entries(self.path) == [MARKER]:
                (self.path / MARKER).unlink(missing_ok=True)  # still locked: nobody joins it
                self._remove_created()
        except OSError:
            pass
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = None

    def _remove_created(self) -> None:
        """Remove the empty folders from ``path`` up to the topmost one the claim made."""
        if self._created is None:
            return
        folder = self.path
        while True:
            folder.rmdir()  # only ever an empty folder
            if folder == self._created or folder.parent == folder:
                return
            folder = folder.parent

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release(failed=kind is not None)


def claim_output_dir(path: Path, *, resuming: bool, hold: bool = True) -> RunDirLock:
    """Create or check ``path`` as this run's output folder and lock it for this process.

    Accepted: a missing or empty folder, or one holding preftune's marker. Without the marker,
    ``resuming`` also accepts a run folder of an older preftune (``config.yaml`` written by
    preftune plus ``metrics.jsonl``) and marks it. Anything else is a one-line ConfigError
    naming what the folder holds; nothing in it is touched.
    """
    if not hold:
        return RunDirLock(path, None)
    created = _first_missing(path)
    for _ in range(3):  # the marker can vanish between open and lock (a failed run's cleanup)
        _check_ownership(path, resuming=resuming)
        fd = _open_marker(path)
        _lock(fd, path)
        if _same_file(fd, path / MARKER):
            _write_holder(fd)
            return RunDirLock(path, fd, created)
        os.close(fd)
    raise ConfigError(f"output_dir: {path}: could not lock {MARKER}; try again")


def _first_missing(path: Path) -> Path | None:
    """The topmost folder of ``path`` that does not exist yet (None: it exists)."""
    missing = None
    for folder in [path, *path.parents]:
        if folder.exists():
            return missing
        missing = folder
    return missing


def _check_ownership(path: Path, *, resuming: bool) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        names = _entries(path)
    except OSError as e:
        raise ConfigError(f"output_dir: {path} is not writable ({e.strerror})") from None
    is_run = "metrics.jsonl" in names
    if is_run and not resuming:
        raise ConfigError(f"output_dir: {path} already holds a run (metrics.jsonl); choose a new "
                          "output_dir, or resume=true to continue it")
    if not names or MARKER in names or (resuming and is_run and _older_run(path)):
        return
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    raise ConfigError(f"output_dir: {path} is not empty and was not made by preftune (it holds "
                      f"{shown}{more}); choose a new or empty folder")


def _entries(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def _older_run(path: Path) -> bool:
    """A run folder written before the marker existed: preftune's config.yaml header."""
    try:
        with (path / "config.yaml").open("rb") as f:
            head = f.readline(200)
    except OSError:
        return False
    return head.startswith(b"# preftune ") and head.rstrip().endswith(b"fully resolved")


def _open_marker(path: Path) -> int:
    try:
        return os.open(path / MARKER, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"output_dir: {path} is not writable ({e.strerror})") from None


def _lock(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"output_dir: {path} is in use by another preftune run "
                          f"({_holder(path)}); wait for it to end or stop it") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise ConfigError(f"output_dir: {path}: cannot lock {MARKER} ({e.strerror})") from None
        warn(f"output_dir: {path}: this file system cannot lock ({e.strerror}); make sure no "
             "other run writes into it")


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _write_holder(fd: int) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.now(UTC).isoformat(timespec="seconds")}
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _holder(path: Path) -> str:
    """'pid N on host H' of the process that locked ``path`` last (read from its marker)."""
    for _ in range(20):  # the holder writes its pid just after locking: wait for it briefly
        try:
            record = json.loads((path / MARKER).read_text(encoding="utf-8"))
            return f"pid {int(record['pid'])} on host {str(record['host'])!r}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "pid unknown"
