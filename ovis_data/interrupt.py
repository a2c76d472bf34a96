"""Ctrl-C in process pools: the terminal sends SIGINT to the whole process group, pool processes included.

Python's default turns it into a KeyboardInterrupt in every pool process, and one waiting for its next task
prints the pool's idle loop as a traceback. `quiet_on_sigint` (a pool's initializer) makes a pool process
interrupt the task it runs under `run_task` (so the task's own cleanup runs, and the pool hands the
interruption back to the main process, whose command says one line) and otherwise ignore it: the main
process cancels what is queued (`cancel_pending`) and the pool's shutdown ends its processes. (Leaving at
once between tasks is no option: an idle pool process may hold the task queue's lock, and the others would
wait for it forever.)
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_busy = False  # a task is running in this pool process


def _on_sigint(signum: int, frame: Any) -> None:
    if _busy:
        raise KeyboardInterrupt


def quiet_on_sigint() -> None:
    """A pool initializer (or a call from one): SIGINT as the module docstring says."""
    signal.signal(signal.SIGINT, _on_sigint)


def run_task(fn: Callable, *args: Any) -> Any:
    """fn(*args) in a pool process, marked as running: a SIGINT meanwhile interrupts it."""
    global _busy
    _busy = True
    try:
        return fn(*args)
    finally:
        _busy = False


def cancel_pending(pool: Executor) -> None:
    """In the main process, on KeyboardInterrupt (or a generator closed early): no queued task starts; the
    pool's shutdown then waits only for the running ones, which SIGINT interrupted."""
    pool.shutdown(wait=False, cancel_futures=True)


@contextmanager
def removed_on_failure(path: Path) -> Iterator[None]:
    """A file being written under a temporary name: removed when the writing fails or is interrupted (a
    killed process leaves it, and the next run writes it again)."""
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise
