"""Worker processes that die with the process they work for.

A SIGKILL gives a process no chance to stop its workers: pool workers busy with a task, DataLoader
workers (whose own watchdog watches their parent, the forkserver, not the trainer) and the processes
holding them up lived on for minutes, holding memory and files. Each worker calls `exit_with(pid)` first
(a pool's initializer, a DataLoader's worker_init_fn), `pid` being the process that asked for the work.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def exit_with(pid: int) -> None:
    """Make this process exit within about a second of process `pid`'s death.

    When `pid` is the parent (fork, spawn), the kernel sends SIGKILL on its death (PR_SET_PDEATHSIG, Linux);
    otherwise (a forkserver's child: its parent is the server) a daemon thread waits on a pidfd of `pid`
    (Linux >= 5.3), or polls it, and ends the process.
    """
    if pid == os.getpid():
        return
    if os.getppid() == pid and sys.platform == "linux" and _parent_death_signal():
        if os.getppid() != pid:  # the parent died before the signal was armed
            os._exit(1)
        return
    threading.Thread(target=_watch, args=(pid,), name=f"exit-with-{pid}", daemon=True).start()


def _parent_death_signal() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)  # readable once the process has exited; no pid-reuse race
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        select.select([fd], [], [])
    else:
        while _alive(pid):
            time.sleep(1.0)
    os._exit(1)  # no cleanup: whatever we were doing was for a process that is gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
