"""Small file helpers: every file a run writes appears whole or not at all."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, default=str) + "\n")


class RunDirLocked(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """`RUN_DIR/.lock`: one run owns its folder, for the run's whole life.

    Exclusion comes from `fcntl.flock` on the open lock file, which the kernel drops when the holder dies in
    any way, so a crashed run never blocks its folder. The file holds the holder's pid, host and start time
    (for the message a second run gets, and for a note when a dead run's file is taken over). `release()`
    removes the file; a run killed with SIGKILL leaves it behind, and the next run takes it over.
    """

    NAME = ".lock"

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / self.NAME
        self._fd: int | None = None

    @staticmethod
    def describe(holder: dict[str, Any]) -> str:
        return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"

    def read(self) -> dict[str, Any] | None:
        """The holder recorded in the lock file (None if there is no readable one)."""
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def held_by_other(self) -> dict[str, Any] | None:
        """The recorded holder if a live process other than this one holds the lock, else None (read-only)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self.read() or {}
        except OSError:  # no flock on this file system: judge by the recorded pid
            holder = self.read()
            return holder if holder is not None and _alive(holder) else None
        finally:
            os.close(fd)
        return None

    def acquire(self) -> str | None:
        """Take the lock (creating the folder); return a note when a dead run's lock file was taken over.
        Raises `RunDirLocked` naming the folder and the holder when a live process has it."""
        for attempt in range(20):
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:  # not writable, or .lock is a folder: say so instead of a traceback
                raise RunDirLocked(
                    f"cannot create the run-folder lock {self.path} ({error.strerror}); choose another --out"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if attempt < 5:  # perhaps only a moment's shared lock of a `held_by_other` check
                    time.sleep(0.02)
                    continue
                holder = self.read() or {}
                raise RunDirLocked(
                    f"{self.run_dir} is in use by another run ({self.describe(holder)}); wait for it to end or "
                    "choose another --out"
                ) from None
            except OSError:  # no flock here (some network file systems): fall back to the recorded pid
                holder = self.read()
                if holder is not None and _alive(holder) and holder.get("pid") != os.getpid():
                    os.close(fd)
                    raise RunDirLocked(
                        f"{self.run_dir} is in use by another run ({self.describe(holder)}); wait for it to end "
                        f"or choose another --out (if that run is gone, delete {self.path})"
                    ) from None
            try:  # the file may have been released (unlinked) between our open and our flock: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = self.read()
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            self._fd = fd
            if previous and previous.get("pid") is not None:
                state = "no longer running" if not _alive(previous) else "no longer holding it"
                return f"took over the stale lock of {self.run_dir} ({self.describe(previous)}: {state})"
            return None
        raise RunDirLocked(f"{self.run_dir}: could not take {self.path} (it keeps changing); try again")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the recorded holder still runs; a holder on another host counts as alive (it cannot be checked)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (KeyError, TypeError, ValueError):
        return False
    return True
