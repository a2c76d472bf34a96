"""One reader for both image layouts: plain files under image_dir, or img2dataset-style tar shards + index.

files:  image_dir/<image_path>, exactly as the meta file names it.
shards: image_dir/NNNNN.tar (members <key>.jpg + <key>.json with image_path), NNNNN.parquet,
        NNNNN_stats.json (written last: the shard's done-marker) and index.parquet mapping
        image_path -> (tar, offset, size) for O(1) reads.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import posixpath
import re
import tarfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .arrowmap import ArrowRows
from .storage import AnyPath, RemotePath, open_binary, read_parquet, write_parquet
from .storage import read_range as _read_range

INDEX_NAME = "index.parquet"
LISTING_SCHEMA = pa.schema([("image_path", pa.string()), ("linked_out", pa.bool_())])
INDEX_SCHEMA = pa.schema(
    [("image_path", pa.string()), ("tar", pa.string()), ("offset", pa.int64()), ("size", pa.int64())]
)
FETCH_BOOKKEEPING = ".fetch"  # image_dir/.fetch/: `ovis-data fetch` bookkeeping, never an image
GET_BOOKKEEPING = ".get"  # image_dir/.get/: `ovis-data get` done-markers and staging, never an image
SHARD_INDEX_DIR = f"{FETCH_BOOKKEEPING}/index"  # one NNNNN.parquet per tar: build_index's parts
SHARD_INDEX_SCHEMA = pa.schema([("image_path", pa.string()), ("offset", pa.int64()), ("size", pa.int64())])
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# Why an image path from a meta file may not be opened (it would escape image_dir): the first rule whose
# pattern matches. One list for both uses: `unsafe_path_reason` (fetch, the readers: one path at a time)
# and `unsafe_path_sql` (validate: millions of paths in DuckDB). The patterns are in the syntax Python's
# re and DuckDB's RE2 share, `$` meaning the end of the text (Python reads it as \Z: its own `$` would
# also match before a final newline).
UNSAFE_PATH_RULES = (
    ("empty path", r"^$"),
    ("absolute path", r"^([/\\]|[A-Za-z]:)"),
    ("NUL byte in path", r"\x00"),
    ("'..' segment", r"(^|[/\\])\.\.([/\\]|$)"),
)
_UNSAFE_PATH = [(reason, re.compile(pattern.replace("$", r"\Z"))) for reason, pattern in UNSAFE_PATH_RULES]


def unsafe_path_reason(image_path: str) -> str | None:
    """Why a meta-file image path may not be opened (it would escape image_dir), or None when it is safe."""
    for reason, pattern in _UNSAFE_PATH:
        if pattern.search(image_path):
            return reason
    return None


def unsafe_path_sql(column: str) -> str:
    """`unsafe_path_reason` of the VARCHAR `column` as a DuckDB expression (NULL when the path is safe)."""

    def text(value: str) -> str:
        return "'" + value.replace("'", "''") + "'"

    whens = (f"WHEN regexp_matches({column}, {text(p)}) THEN {text(r)}" for r, p in UNSAFE_PATH_RULES)
    return "CASE " + " ".join(whens) + " END"


class ImageStore:
    """Images of one image_dir, whichever layout fetch (or a publisher's archive) left there."""

    def __init__(self, image_dir: AnyPath):
        # a RemotePath (object storage) is read through fsspec; a local folder through os, as ever
        self.image_dir = image_dir if isinstance(image_dir, RemotePath) else Path(image_dir)
        self._real_root = "" if isinstance(image_dir, RemotePath) else os.path.realpath(self.image_dir)
        self.layout = "shards" if is_shard_dir(self.image_dir) else "files"
        self._index: pa.Table | None = None
        self._batches: list[pa.RecordBatch] = []
        self._firsts: list[str] = []
        self._mapped: ArrowRows | None = None  # the index, when map_index gave it
        self._tars: dict[str, BinaryIO] = {}  # open tars of a local shards store, by name

    # -- listing ------------------------------------------------------------------------------------
    def listing(self) -> pa.Table:
        """Every image present, as a table (image_path, linked_out): no per-file stat, one directory walk."""
        if self.layout == "shards":
            paths = load_index(self.image_dir).column("image_path")
            return pa.table({"image_path": paths, "linked_out": pa.array(np.zeros(len(paths), dtype=bool))})
        if isinstance(self.image_dir, RemotePath):  # object stores have no links: one listing of the prefix
            names = [
                p
                for p in self.image_dir.find()
                if not p.startswith((FETCH_BOOKKEEPING + "/", GET_BOOKKEEPING + "/"))
            ]
            linked = pa.array(np.zeros(len(names), dtype=bool))
            return pa.table({"image_path": pa.array(names, pa.string()), "linked_out": linked})
        # Names go to Arrow every 64k entries: ten million files never sit in memory as Python strings.
        chunks: list[pa.RecordBatch] = []
        paths: list[str] = []
        linked_out: list[bool] = []

        def flush() -> None:
            chunks.append(
                pa.record_batch([pa.array(paths, pa.string()), pa.array(linked_out)], LISTING_SCHEMA)
            )
            paths.clear()
            linked_out.clear()

        stack = [""]
        while stack:
            rel = stack.pop()
            with os.scandir(self.image_dir / rel if rel else self.image_dir) as it:
                for entry in it:
                    name = f"{rel}/{entry.name}" if rel else entry.name
                    if entry.is_symlink():
                        paths.append(name)
                        linked_out.append(not self._inside(entry.path))
                    elif entry.is_dir(follow_symlinks=False):
                        if name not in (FETCH_BOOKKEEPING, GET_BOOKKEEPING):  # fetch's and get's own files
                            stack.append(name)
                    else:
                        paths.append(name)
                        linked_out.append(False)
                    if len(paths) >= 65536:
                        flush()
        flush()
        return pa.Table.from_batches(chunks, LISTING_SCHEMA)

    def _inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self._real_root or real.startswith(self._real_root + os.sep)

    # -- reading ------------------------------------------------------------------------------------
    def file_path(self, image_path: str) -> Path:
        """Filesystem path of an image in the files layout, refusing anything that escapes image_dir."""
        reason = unsafe_path_reason(image_path)
        if reason:
            raise PermissionError(f"{image_path!r}: {reason}")
        path = self.image_dir / image_path
        if isinstance(path, RemotePath):  # no links in an object store: the safe name is the check
            return path  # type: ignore[return-value]
        if not self._inside(str(path)):
            raise PermissionError(f"{image_path!r}: link out of {self.image_dir}")
        return path

    def map_index(self, path: Path) -> None:
        """Look images up in `path`, this store's index sorted as load_index sorts it and saved as an
        Arrow file, read by pread (arrowmap.ArrowRows.find_first: a path every 256 rows in memory, one
        block of rows read per lookup): its pages are the kernel's cache, shared by every process that
        reads, not a copy loaded by each, and a lookup costs the same whatever the index's size."""
        self._mapped = ArrowRows(path, ["image_path", "tar", "offset", "size"])

    def _use_index(self, table: pa.Table) -> None:
        # Searched batch by batch: the first path of each, then a bisection inside one batch (a
        # bisection over a many-chunk column pays a chunk lookup per probe: ~6x slower)
        self._index = table
        self._batches = [b for b in table.to_batches() if b.num_rows]
        self._firsts = [b.column("image_path")[0].as_py() for b in self._batches]

    def read_bytes(self, image_path: str) -> bytes:
        if self.layout == "files":
            return self.file_path(image_path).read_bytes()
        if self._mapped is not None:
            row = self._mapped.find_first("image_path", image_path)
            if row is None:
                raise FileNotFoundError(f"{image_path!r} not in {self.image_dir / INDEX_NAME}")
            tar, offset, size = self._mapped.read(row, ("tar", "offset", "size"))
            return self._read_member(tar, offset, size)
        if self._index is None:
            # Kept as Arrow, sorted by path, and searched by bisection: a 10M-image index costs its
            # Arrow bytes, not a dict of ten million Python objects, in every worker that reads.
            self._use_index(load_index(self.image_dir).combine_chunks())
        # the first occurrence: in the last batch starting before the path, else first in the next one
        k = max(0, bisect.bisect_left(self._firsts, image_path) - 1)
        paths = self._batches[k].column("image_path") if self._batches else pa.array([], pa.string())
        i = bisect.bisect_left(_ArrowKeys(paths), image_path)
        if i == len(paths) and k + 1 < len(self._batches):
            k, i = k + 1, 0
            paths = self._batches[k].column("image_path")
        if i == len(paths) or paths[i].as_py() != image_path:
            raise FileNotFoundError(f"{image_path!r} not in {self.image_dir / INDEX_NAME}")
        batch = self._batches[k]
        tar, offset, size = (batch.column(c)[i].as_py() for c in ("tar", "offset", "size"))
        return self._read_member(tar, offset, size)

    def _read_member(self, tar: str, offset: int, size: int) -> bytes:
        if isinstance(self.image_dir, RemotePath):
            return read_range(self.image_dir / tar, offset, size)
        f = self._tars.get(tar)
        if f is None:  # tars stay open: an open() per image cost as much as the read (pack reads millions)
            if len(self._tars) >= _OPEN_TARS:
                self.close()
            f = self._tars[tar] = open(self.image_dir / tar, "rb", buffering=0)  # noqa: SIM115 - close()
        data = os.pread(f.fileno(), size, offset)
        if len(data) != size:
            where = self.image_dir / tar
            raise OSError(f"{where}: short read at offset {offset} ({len(data)} of {size} bytes)")
        return data

    def close(self) -> None:
        """Close the tars read_bytes keeps open."""
        for f in self._tars.values():
            f.close()
        self._tars.clear()


_OPEN_TARS = 256  # at most this many open at once per store


class _ArrowKeys:
    """A sorted Arrow string column seen as a sequence, for bisect."""

    def __init__(self, column: pa.ChunkedArray):
        self._column = column

    def __len__(self) -> int:
        return len(self._column)

    def __getitem__(self, i: int) -> str:
        return self._column[i].as_py()


def read_range(path: AnyPath, offset: int, size: int) -> bytes:
    data = _read_range(path, offset, size)
    if len(data) != size:
        raise OSError(f"{path}: short read at offset {offset} ({len(data)} of {size} bytes)")
    return data


def is_shard_dir(image_dir: AnyPath) -> bool:
    """A shards layout has an index or at least one finished shard (its _stats.json done-marker)."""
    if (image_dir / INDEX_NAME).exists():
        return True
    return image_dir.is_dir() and any(image_dir.glob("*_stats.json"))


def load_index(image_dir: AnyPath) -> pa.Table:
    """The image_path -> (tar, offset, size) index; built from the finished shards when absent or stale."""
    path = image_dir / INDEX_NAME
    if path.exists():
        table = read_parquet(path)
        covered = json.loads((table.schema.metadata or {}).get(b"shards", b"null"))
        if covered == _finished_shards(image_dir):
            return _sorted(table)
    return build_index(image_dir)


def index_file(image_dir: Path) -> Path | None:
    """index.parquet of a local shards store, built first when missing or stale, for a reader that scans
    it itself (DuckDB, in bounded memory) rather than holding its 10M rows; None for an object store."""
    if not isinstance(image_dir, Path):  # an object store's RemotePath: no local file to scan
        return None
    path = Path(image_dir) / INDEX_NAME
    if path.exists():
        covered = json.loads((pq.read_schema(path).metadata or {}).get(b"shards", b"null"))
        if covered == _finished_shards(image_dir):
            return path
    build_index(image_dir)
    return path


def _sorted(table: pa.Table) -> pa.Table:
    """The index in image_path order (older or imported indexes may not be)."""
    paths = table.column("image_path")
    if len(paths) < 2 or pc.all(pc.less_equal(paths[:-1], paths[1:])).as_py():
        return table
    return table.take(pc.sort_indices(table, sort_keys=[("image_path", "ascending")]))


def _finished_shards(image_dir: AnyPath) -> list[str]:
    return sorted(p.name[: -len("_stats.json")] for p in image_dir.glob("*_stats.json"))


def build_index(image_dir: AnyPath) -> pa.Table:
    """index.parquet over every finished shard, written atomically. Each shard's part comes from its
    saved shard index when that still matches the tar (fetch writes it from the offsets it wrote, so a
    10M-image dir is never re-read), else from one scan of the tar, saved for next time."""
    parts = []
    shards = _finished_shards(image_dir)
    for shard in shards:
        tar_path = image_dir / f"{shard}.tar"
        if not tar_path.exists():
            continue
        part = read_shard_index(image_dir, shard)
        if part is None:
            part = _scan_tar(tar_path)
            if not isinstance(image_dir, RemotePath):
                with contextlib.suppress(OSError):  # a read-only store still gets its index in memory
                    write_shard_index(image_dir, shard, part)
        parts.append(
            pa.table(
                {
                    "image_path": part.column("image_path"),
                    "tar": pa.array([tar_path.name] * part.num_rows, pa.string()),
                    "offset": part.column("offset"),
                    "size": part.column("size"),
                }
            )
        )
    schema = INDEX_SCHEMA.with_metadata({"shards": json.dumps(shards)})
    table = pa.concat_tables(parts).cast(INDEX_SCHEMA) if parts else INDEX_SCHEMA.empty_table()
    table = _sorted(table.replace_schema_metadata(schema.metadata))
    write_parquet(table, image_dir / INDEX_NAME)
    return table


def _scan_tar(tar_path: AnyPath) -> pa.Table:
    """(image_path, offset, size) of a tar's images, paired with their `<key>.json` by key."""
    members: dict[str, tarfile.TarInfo] = {}
    metas: dict[str, str] = {}
    with open_binary(tar_path) as raw, tarfile.open(fileobj=raw) as tf:
        for m in tf:
            key, ext = posixpath.splitext(m.name)
            if ext == ".json":
                meta = json.loads(tf.extractfile(m).read())  # type: ignore[union-attr]
                if meta.get("image_path"):
                    metas[key] = meta["image_path"]
            elif ext.lower() in IMAGE_EXTS:
                members[key] = m
    found = [(metas[k], m.offset_data, m.size) for k, m in members.items() if k in metas]
    return pa.table(
        {
            "image_path": pa.array([f[0] for f in found], pa.string()),
            "offset": pa.array([f[1] for f in found], pa.int64()),
            "size": pa.array([f[2] for f in found], pa.int64()),
        },
        schema=SHARD_INDEX_SCHEMA,
    )


def shard_index_path(image_dir: AnyPath, shard: str) -> AnyPath:
    return image_dir / SHARD_INDEX_DIR / f"{shard}.parquet"


def _tar_identity(tar_path: Path) -> str:
    st = tar_path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def write_shard_index(image_dir: Path, shard: str, part: pa.Table) -> None:
    """Save one shard's (image_path, offset, size), stamped with its tar's size and mtime: a tar
    rewritten later no longer matches and gets scanned."""
    tar_path = image_dir / f"{shard}.tar"
    path = shard_index_path(image_dir, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = part.cast(SHARD_INDEX_SCHEMA).replace_schema_metadata({"tar": _tar_identity(tar_path)})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_shard_index(image_dir: AnyPath, shard: str) -> pa.Table | None:
    """A shard's saved index, or None when missing, unreadable or not made from the tar now there."""
    path = shard_index_path(image_dir, shard)
    if isinstance(path, RemotePath):
        # fetch uploads a shard's index part before its done-marker and never rewrites a tar without
        # its part: there is no mtime to stamp, the part is current when present
        try:
            return read_parquet(path) if path.exists() else None
        except (OSError, pa.ArrowInvalid):
            return None
    try:
        table = pq.read_table(path)
        stamp = (table.schema.metadata or {}).get(b"tar", b"").decode()
        if stamp != _tar_identity(image_dir / f"{shard}.tar"):
            return None
    except (OSError, pa.ArrowInvalid):
        return None
    return table
