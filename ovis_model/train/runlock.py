"""One run per stage folder: rank 0 holds an exclusive lock on `RUN/stageN/` for the run's life.

Two runs into one `--out` would interleave metrics.jsonl and overwrite each other's checkpoints and model.
The lock is an `flock` on `RUN/stageN/.lock`, which names the holder (pid and host); the kernel drops it
when the holder dies, however it dies, so a lock left by a killed run is simply taken over.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Callable
from pathlib import Path

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None
        self._made: list[Path] = []  # folders this lock created (run_dir and missing parents), deepest first

    def acquire(self, say: Callable[[str], None] = print) -> None:
        """Take the lock or raise RunLockedError naming its holder; say so when taking over a stale one."""
        self._made = [d for d in (self.path.parent, *self.path.parent.parents) if not d.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by {holder} (lock {self.path}): wait for that run, stop it, "
                "or use another --out"
            ) from None
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if previous:  # a holder that ended without releasing: killed (the kernel dropped its lock)
            say(f"  took over the lock of {previous}, which is no longer running ({self.path})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Empty the holder line (a clean end) and drop the lock; the file stays (removing it would race
        with a run opening it)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def abandon(self) -> None:
        """A run refused before it wrote anything: release, and where this lock made the run folder and it
        holds nothing else, remove the lock and the folders it made (a mistake leaves nothing behind)."""
        self.release()
        if self._made and [p.name for p in self.path.parent.iterdir()] == [LOCK_NAME]:
            self.path.unlink(missing_ok=True)
            for d in self._made:
                try:
                    d.rmdir()
                except OSError:  # not empty (another run, or its own content): keep it
                    break
