"""Where data lives: a local path (plain pathlib and os calls: the fast path, no fsspec), or an object-store
URL (`s3://bucket/prefix`, `gs://...`, any fsspec protocol) seen through `RemotePath`.

fsspec (and s3fs for s3://) is an optional extra, `pip install 'ovis-toolkit[s3]'`, imported only when a URL
is given. Object stores have no rename: a whole-object PUT is already atomic (an object appears only when
complete), so on those `put_file` uploads in place; on other fsspec backends it uploads to a temporary name
and moves it. Files that must be local (DuckDB's input, memory-mapped work files) are staged in a local
directory and published from there.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

from .errors import OvisDataError

# Protocols where a PUT of a whole object is atomic (readers never see part of it).
ATOMIC_PUT = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})


def is_url(value: object) -> bool:
    """True for a RemotePath or an 'scheme://...' string other than file://."""
    if isinstance(value, RemotePath):
        return True
    return isinstance(value, str) and "://" in value and not value.startswith("file://")


def _url_to_fs(url: str) -> tuple[Any, str]:
    try:
        from fsspec.core import url_to_fs
    except ImportError as e:
        raise OvisDataError(f"{url}: object storage needs fsspec: pip install 'ovis-toolkit[s3]'") from e
    try:
        return url_to_fs(url)
    except ImportError as e:  # e.g. s3fs missing for s3://
        raise OvisDataError(f"{url}: {e} (pip install 'ovis-toolkit[s3]' for s3://)") from e
    except ValueError as e:
        raise OvisDataError(f"{url}: {e}") from e


class RemotePath:
    """A file or prefix in an fsspec filesystem, with the few pathlib methods this project's data code
    uses (`/`, name, exists, is_file, is_dir, stat, glob, open, read_bytes/read_text, unlink)."""

    __slots__ = ("url", "fs", "path")

    def __init__(self, url: str, fs: Any = None, path: str | None = None) -> None:
        self.url = url.rstrip("/")
        if fs is None:
            fs, path = _url_to_fs(self.url)
        self.fs = fs
        self.path = (path if path is not None else fs._strip_protocol(self.url)).rstrip("/")

    @property
    def protocol(self) -> str:
        return self.url.split("://", 1)[0]

    def __truediv__(self, part: str | os.PathLike) -> RemotePath:
        part = str(part).strip("/")
        return RemotePath(f"{self.url}/{part}", self.fs, f"{self.path}/{part}")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __reduce__(self) -> tuple:  # a fresh client per process (fsspec instances cache by their options)
        return (RemotePath, (self.url,))

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.url.rsplit("/", 1)[0], self.fs, self.path.rsplit("/", 1)[0])

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def _fresh(self) -> Any:
        """The filesystem with its listings of this path forgotten: another process or node may have
        written here since (s3fs caches listings per instance)."""
        self.fs.invalidate_cache(self.path)
        return self.fs

    def exists(self) -> bool:
        return bool(self._fresh().exists(self.path))

    def is_file(self) -> bool:
        return bool(self._fresh().isfile(self.path))

    def is_dir(self) -> bool:
        return bool(self._fresh().isdir(self.path))

    def stat(self) -> SimpleNamespace:
        """st_size and st_mtime_ns, as far as the store tells (0 when it keeps no modification time)."""
        info = self._fresh().info(self.path)
        mtime = info.get("LastModified") or info.get("mtime") or info.get("updated") or 0
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        elif isinstance(mtime, str):
            from datetime import datetime

            mtime = datetime.fromisoformat(mtime.replace("Z", "+00:00")).timestamp()
        return SimpleNamespace(st_size=int(info.get("size") or 0), st_mtime_ns=int(float(mtime) * 1e9))

    def glob(self, pattern: str) -> list[RemotePath]:
        """Direct children matching a one-level pattern, sorted by name."""
        try:
            names = self._fresh().ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for n in sorted(names):
            base = n.rstrip("/").rsplit("/", 1)[-1]
            if fnmatch.fnmatchcase(base, pattern):
                out.append(self / base)
        return out

    def find(self) -> list[str]:
        """Every file under this prefix, as paths relative to it, sorted."""
        prefix = self.path + "/"
        found = self._fresh().find(self.path)
        return sorted(p[len(prefix) :] for p in found if p.startswith(prefix))

    def open(self, mode: str = "rb", **kwargs: Any) -> IO:
        return self.fs.open(self.path, mode, **kwargs)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def read_range(self, offset: int, size: int) -> bytes:
        return self.fs.cat_file(self.path, start=offset, end=offset + size)

    def write_bytes(self, data: bytes) -> None:
        """Atomic on object stores (one PUT); elsewhere through a temporary name."""
        if self.protocol in ATOMIC_PUT:
            self.fs.pipe_file(self.path, data)
        else:
            tmp = self.with_name(f".{self.name}.tmp")
            tmp.fs.pipe_file(tmp.path, data)
            self.fs.mv(tmp.path, self.path)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def put_file(self, local: str | os.PathLike) -> None:
        """Upload a local file so that this path shows it whole or not at all."""
        if self.protocol in ATOMIC_PUT:
            self.fs.put_file(os.fspath(local), self.path)
        else:
            tmp = self.with_name(f".{self.name}.tmp")
            self.fs.put_file(os.fspath(local), tmp.path)
            self.fs.mv(tmp.path, self.path)

    def get_file(self, local: str | os.PathLike) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        self.fs.get_file(self.path, os.fspath(local))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no directories: nothing to make (kept for pathlib compatibility)."""


AnyPath = Path | RemotePath


def as_path(value: str | os.PathLike | RemotePath) -> AnyPath:
    """A RemotePath for a URL, else a pathlib.Path (the local fast path)."""
    if isinstance(value, RemotePath):
        return value
    if is_url(value):
        return RemotePath(str(value))
    text = os.fspath(value)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def open_binary(path: str | os.PathLike | RemotePath) -> IO[bytes]:
    """A seekable binary reader of a whole file read many times (a packed shard, a tar): the built-in
    open for local paths; for URLs, a local copy in the shard cache (see cached_copy)."""
    if is_url(path):
        return open(cached_copy(as_path(path)), "rb")  # type: ignore[arg-type]  # noqa: SIM115
    return open(path, "rb")  # noqa: SIM115 - the caller closes it


_CACHED: dict[str, tuple[Path, int]] = {}  # url -> (local copy, bytes), least recently used first
CACHE_BYTES = int(float(os.environ.get("OVIS_CACHE_GB", "16")) * 2**30)


def cached_copy(path: RemotePath) -> Path:
    """A local copy of an object, downloaded once per node: the loader re-opens a shard for every window
    of records it reads, which costs three requests each on an object store and nothing on a disk.
    Copies live in $OVIS_CACHE (default: the temporary directory's ovis-cache), named by URL, size and
    modification time (a rewritten object is fetched again), shared by the processes of a node through
    atomic renames; each process drops its least recently used copies past $OVIS_CACHE_GB (16)."""
    hit = _CACHED.pop(path.url, None)
    if hit is not None:
        _CACHED[path.url] = hit
        return hit[0]
    import hashlib

    st = path.stat()
    digest = hashlib.sha256(f"{path.url}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    base = Path(os.environ.get("OVIS_CACHE") or Path(tempfile.gettempdir()) / "ovis-cache")
    local = base / f"{digest}-{path.name}"
    if not local.exists():
        tmp = base / f".{local.name}.{os.getpid()}.tmp"
        path.get_file(tmp)
        os.replace(tmp, local)
    _CACHED[path.url] = (local, st.st_size)
    while sum(n for _, n in _CACHED.values()) > CACHE_BYTES and len(_CACHED) > 1:
        old, _ = _CACHED.pop(next(iter(_CACHED)))
        old.unlink(missing_ok=True)  # a process still reading it keeps its open file
    return local


def read_range(path: str | os.PathLike | RemotePath, offset: int, size: int) -> bytes:
    if is_url(path):
        return as_path(path).read_range(offset, size)  # type: ignore[union-attr]
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def read_parquet(path: AnyPath, **kwargs: Any):
    """pyarrow.parquet.read_table of a local path or a RemotePath."""
    import pyarrow.parquet as pq

    if isinstance(path, RemotePath):
        return pq.read_table(path.path, filesystem=path.fs, **kwargs)
    return pq.read_table(path, **kwargs)


def staging_dir(kind: str, url: RemotePath | str) -> Path:
    """A local directory kept for one remote location (resumable work files live here), under
    $OVIS_STAGING or the system's temporary directory."""
    import hashlib

    base = Path(os.environ.get("OVIS_STAGING") or Path(tempfile.gettempdir()) / "ovis-staging")
    digest = hashlib.sha256(str(url).encode()).hexdigest()[:16]
    path = base / f"{kind}-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def local_copy(path: AnyPath) -> Iterator[Path]:
    """The file itself when local; else a temporary local copy (deleted afterwards), same name."""
    if not isinstance(path, RemotePath):
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="ovis-"))
    try:
        local = tmp / path.name
        path.get_file(local)
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_parquet(table: Any, path: AnyPath) -> None:
    """Write a parquet file whole: through a temporary name locally, as one PUT to an object store."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(path, RemotePath):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        path.write_bytes(sink.getvalue().to_pybytes())
        return
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
