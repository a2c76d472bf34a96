"""A full disk while writing a checkpoint or the model: one line naming the folder and the space needed.

torch's writer reports ENOSPC as a RuntimeError ("PytorchStreamWriter failed writing file ..."), Python's
as OSError; either way the user saw a 100-line traceback. Here any write failure while the folder's file
system has less free space than the write needs becomes a `DiskFullError` saying where and how much.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class DiskFullError(RuntimeError):
    """No space left where the run writes: one line naming the path and the space needed."""


def free_bytes(path: Path) -> int:
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TB"


def _is_disk_full(e: BaseException, path: Path, needed: int) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch's zip writer says neither ENOSPC nor "no space" ("unexpected pos 55168 vs 55040", "file write
    # failed"): a write error while the file system has less room than the write needs is taken as full
    return "no space left" in str(e).lower() or (
        isinstance(e, OSError | RuntimeError) and free_bytes(path) < max(needed, 1)
    )


@contextmanager
def writing(path: Path, what: str, needed: int) -> Iterator[None]:
    """Around a write of about `needed` bytes into `path`: a full disk becomes one `DiskFullError` line."""
    try:
        yield
    except Exception as e:
        if isinstance(e, DiskFullError) or not _is_disk_full(e, path, needed):
            raise
        raise DiskFullError(
            f"{path}: no space left on device writing {what} (needs about {_human(needed)}, "
            f"{_human(free_bytes(path))} free): free space or move --out",
        ) from e


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
