"""Cleaning up after a benchmark's child runs: everything a child started in its own session."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (a child started with start_new_session=True): its DataLoader
    workers, forkserver and any compiler a JIT build started in a process group of its own."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # after the command: state, ppid, pgrp, session
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue
