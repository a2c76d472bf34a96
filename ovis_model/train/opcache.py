"""DeepSpeed's CPU communication op, built once per virtual environment, never waited on forever.

DeepSpeed compiles a small C++ op (`deepspeed_shm_comm`) at its first start, into torch's extension cache:
`~/.cache/torch_extensions` by default, shared by every environment, so two environments (other torch or
DeepSpeed versions) rebuilt it in turn; and a build killed midway leaves torch's `lock` file in the op's
folder, on which every later start waits without a word. Here the cache is `TORCH_EXTENSIONS_DIR` if the
user set it, else a folder inside the environment (`sys.prefix`); builds by this toolkit take turns on an
flock, and a torch build lock found while holding it is one a killed build left: it is removed, saying so.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ENV = "TORCH_EXTENSIONS_DIR"
GUARD = ".ovis-build.lock"


def extensions_dir() -> Path:
    """The cache in use: the user's TORCH_EXTENSIONS_DIR, else this environment's own (set for torch)."""
    if not os.environ.get(ENV):
        os.environ[ENV] = str(Path(sys.prefix) / "var" / "torch_extensions")
    return Path(os.environ[ENV])


@contextmanager
def build_turn(say: Callable[[str], None] = print) -> Iterator[Path]:
    """Hold this environment's build turn (other starts wait on it, saying so once); stale torch build
    locks are removed on entry. Yields the cache folder."""
    root = extensions_dir()
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / GUARD, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + 5  # ranks of one run take turns loading the built op: silently
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    say(f"  waiting for another start building DeepSpeed's CPU op (lock {root / GUARD})")
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    break
                time.sleep(0.1)
        for stale in remove_stale_locks(root):
            say(f"  removed {stale}: a DeepSpeed op build was killed midway; building again")
        yield root
    finally:
        os.close(fd)


def remove_stale_locks(root: Path) -> list[Path]:
    """torch's build locks (`OP/lock`) under `root`: with the build turn held, no build of ours is running,
    so each was left by a killed one."""
    removed = []
    for lock in sorted(root.glob("*/lock")) + sorted(root.glob("*/*/lock")):
        lock.unlink(missing_ok=True)
        removed.append(lock)
    return removed


def build_cpu_op(say: Callable[[str], None] = print) -> None:
    """Build (or load the built) DeepSpeed CPU op in its turn, before `deepspeed.init_distributed`, which
    would otherwise build it unguarded. Without a CUDA device only; a DeepSpeed without the op: nothing."""
    try:
        from deepspeed.comm.torch import build_shm_op
    except ImportError:  # another DeepSpeed layout: it builds (or not) on its own
        return
    with build_turn(say):
        build_shm_op()
