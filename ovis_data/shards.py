"""Packed shards on disk: deterministic webdataset tars of packed records, and reading them back.

The records and their members are those of the shard contract (`ovis_data.shardformat`). Every tar header
is fixed (mtime 0, uid/gid 0, no user names, mode 0644) and members are written in one order, so the same
records give the same bytes; a shard is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Container, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .shardformat import ARRAYS, Record, ShardError, array_member, image_member, meta_member, split_member
from .storage import RemotePath, open_binary

_ZERO_BLOCK = bytes(512)


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


class _HashingFile:
    """A write-only file that hashes what passes through it (the manifest's shard sha256, for free)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()
        self.size = 0

    def tell(self) -> int:
        return self.size

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte header tarfile writes for a regular file `name` of `size` bytes with the fixed fields
    above (USTAR format), built directly: tarfile's TarInfo copy and field encoding cost more than the
    data they describe for the shards' small members (a test holds the two byte-identical)."""
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"tar member name {name!r} longer than 100 bytes")
    head = b"".join(
        (
            raw.ljust(100, b"\0"),
            b"0000644\x000000000\x000000000\x00",  # mode, uid, gid (octal, NUL-ended)
            b"%011o\0" % size,
            b"00000000000\0",  # mtime
            b"        ",  # checksum, counted as spaces
            b"0",  # regular file
            bytes(100),  # link name
            b"ustar\x0000",
            bytes(64 + 16),  # user and group names, device numbers (none for a regular file)
            bytes(167),  # prefix and padding
        )
    )
    return head[:148] + b"%06o\0 " % sum(head) + head[156:]


class ShardWriter:
    """Writes records into `path` atomically: `path.tmp` while open, renamed by close(). The bytes are
    those of a USTAR tarfile with the fixed headers above, two zero blocks at the end and padding to a
    whole 10 KiB record, as tarfile writes them."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self._hashing = _HashingFile(self._file)
        self.records = 0

    def _add(self, name: str, data: bytes) -> None:
        pad = -len(data) % 512
        self._hashing.write(ustar_header(name, len(data)) + data + _ZERO_BLOCK[:pad])

    def write(self, rec: Record) -> None:
        if "." in rec.key:
            raise ValueError(f"record key {rec.key!r} contains a dot")
        for array in ARRAYS:
            self._add(array_member(rec.key, array), npy_bytes(getattr(rec, array).astype(np.int32)))
        for i, jpg in enumerate(rec.images):
            self._add(image_member(rec.key, i), jpg)
        self._add(meta_member(rec.key), json.dumps(rec.meta, sort_keys=True, ensure_ascii=False).encode())
        self.records += 1

    def close(self) -> tuple[str, int]:
        """Finish the tar, make it durable, rename it into place; returns (sha256, bytes)."""
        end = self._hashing.size + 2 * 512
        self._hashing.write(bytes(2 * 512 + -end % tarfile.RECORDSIZE))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return self._hashing.sha.hexdigest(), self._hashing.size

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


# what np.save writes for the 1-D arrays ShardWriter stores (format 1.0, little-endian integers)
_NPY_1D = re.compile(
    rb"\x93NUMPY\x01\x00..\{'descr': '(<i4|<i8)', 'fortran_order': False, 'shape': \((\d+),\), \} *\n", re.S
)


def load_npy(data: bytes) -> np.ndarray:
    """`np.load` of one .npy member. The shards' own 1-D int arrays are parsed directly (np.load's
    literal_eval of the header cost more than the rest of reading a record); anything else goes to np.load."""
    m = _NPY_1D.match(data)
    if m is None or int.from_bytes(data[8:10], "little") != m.end() - 10:
        return np.load(io.BytesIO(data), allow_pickle=False)
    dtype, n = np.dtype(m.group(1).decode()), int(m.group(2))
    if len(data) - m.end() != n * dtype.itemsize:
        raise ValueError(f"npy data holds {len(data) - m.end()} bytes, its header says {n} x {dtype}")
    return np.frombuffer(data, dtype, count=n, offset=m.end()).copy()


def _fill(rec: Record, ext: str, data: bytes) -> None:
    if ext.endswith(".npy") and ext[: -len(".npy")] in ARRAYS:
        setattr(rec, ext[: -len(".npy")], load_npy(data))
    elif ext.startswith("img_"):
        rec.images.append(data)
    elif ext == "json":
        rec.meta = json.loads(data)


class _NotPlain(Exception):
    """A member a plain ustar header walk does not handle (pax or GNU long names, base-256 sizes)."""


def _plain_members(f: BinaryIO) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file of a plain ustar tar, from its 512-byte headers
    alone (what ShardWriter writes): ~10x cheaper per member than tarfile, which matters at ~6 members
    a record. Checksums are verified; a truncated header raises EOFError."""
    offset = 0
    while True:
        f.seek(offset)
        header = f.read(512)
        if len(header) < 512:
            raise EOFError(f"tar ends inside the header at byte {offset} (truncated shard)")
        if header == _ZERO_BLOCK:
            return
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        if stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise tarfile.HeaderError(f"bad checksum in the tar header at byte {offset}")
        if header[156:157] not in (b"0", b"\0") or header[124] & 0x80:
            raise _NotPlain
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
        yield (prefix + b"/" + name if prefix else name).decode("utf-8"), offset + 512, size
        offset += 512 + (size + 511) // 512 * 512


def _tarfile_members(tf: tarfile.TarFile) -> Iterator[tuple[str, Any, int]]:
    for m in tf:
        if m.isfile():
            yield m.name, m, m.size


def iter_records(
    path: Path | str | RemotePath, wanted: Container[int] | None = None, stop_after: int | None = None
) -> Iterator[tuple[int, Record]]:
    """(index, record) of a shard's records in order; only the `wanted` indices are read (the others'
    members are skipped by seeking past them), and reading stops after record `stop_after`.

    Any damage (truncated or corrupt tar, unreadable array or JSON) raises ShardError naming the shard
    and the record it hit. Tars other than plain ustar (pax headers, long names) are read with tarfile.
    """
    done = -1  # last index yielded: a fallback to tarfile resumes after it
    index = 0
    try:
        with open_binary(path) as f:
            try:
                for index, rec in _group(
                    _plain_members(f), lambda off, size: _read_at(f, off, size), wanted, stop_after
                ):
                    done = index
                    yield index, rec
                return
            except _NotPlain:
                pass
        with open_binary(path) as raw, tarfile.open(fileobj=raw) as tf:

            def read(member: tarfile.TarInfo, size: int) -> bytes:
                handle = tf.extractfile(member)
                return handle.read() if handle is not None else b""

            for index, rec in _group(_tarfile_members(tf), read, wanted, stop_after):
                if index > done:
                    yield index, rec
    except ShardError as e:
        raise ShardError(path, e.record, e.reason) from e
    except (tarfile.TarError, OSError, EOFError, ValueError, UnicodeDecodeError) as e:  # ValueError: npy/json
        raise ShardError(path, max(index, done + 1, 0), f"{type(e).__name__}: {e}") from e


def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _group(
    members: Iterator[tuple[str, Any, int]],
    read: Callable[[Any, int], bytes],
    wanted: Container[int] | None,
    stop_after: int | None,
) -> Iterator[tuple[int, Record]]:
    """Members sharing a key (adjacent, as webdataset writes them) become one Record, in order."""
    empty = np.zeros(0, dtype=np.int32)
    index, key, current = -1, None, None
    for name, handle, size in members:
        k, ext = split_member(name)
        if k != key:
            if current is not None:
                yield index, current
                current = None
            index, key = index + 1, k
            if stop_after is not None and index > stop_after:
                return
            if wanted is None or index in wanted:
                current = Record(k, empty, empty, empty)
        if current is not None:
            data = read(handle, size)
            if len(data) != size:
                raise ShardError("", index, f"member {name} truncated ({len(data)} of {size} bytes)")
            try:
                _fill(current, ext, data)
            except (ValueError, OSError) as e:
                raise ShardError("", index, f"member {name}: {type(e).__name__}: {e}") from e
    if current is not None:
        yield index, current


def read_records(path: Path) -> Iterator[Record]:
    """The records of a shard, in order (plain tarfile: no webdataset needed)."""
    for _, rec in iter_records(path):
        yield rec
