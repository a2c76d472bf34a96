"""Packed shards on disk: deterministic webdataset tars of packed sequences, and reading them back.

One record per packed sequence, members `<key>.input_ids.npy`, `<key>.labels.npy`, `<key>.lengths.npy`,
`<key>.img_NNN.jpg` (in placeholder order) and `<key>.json` (provenance). Every tar header is fixed
(mtime 0, uid/gid 0, no user names, mode 0644) and members are written in one order, so the same
records give the same bytes; a shard is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import warnings
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from ..constants import IGNORE_ID, vit_resized_size
from ..storage import RemotePath, open_binary

try:  # reads a JPEG's size and colour space without PIL's per-file parsing (a tenth of the time)
    import simplejpeg
except ImportError:  # a platform without its wheel: PIL reads the header
    simplejpeg = None

JPEG_QUALITY = 95
_ZERO_BLOCK = bytes(512)


@dataclass
class Record:
    """One packed sequence: its sub-samples' tokens one after another, their images and provenance."""

    key: str
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32
    lengths: np.ndarray  # int32, per sub-sample
    images: list[bytes] = field(default_factory=list)  # JPEG, in placeholder order
    meta: dict = field(default_factory=dict)  # {"samples": [{"dataset", "row", "id"}, ...], ...}

    def samples(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Each sub-sample's (input_ids, labels), exactly as it was tokenized."""
        start = 0
        for n in self.lengths.tolist():
            yield self.input_ids[start : start + n], self.labels[start : start + n]
            start += n


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def resize_for_vit(data: bytes, size: int) -> tuple[bytes, int, int]:
    """RGB JPEG whose longer side is `size`, aspect kept (short side int(short/long*size), as v1 did);
    the model pads it to a square. A JPEG already so is passed through byte for byte."""
    if simplejpeg is not None and data[:2] == b"\xff\xd8":
        try:
            h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:  # PIL decides, and raises what a damaged file deserves
            pass
        else:  # the 3-component colour spaces PIL opens as mode "RGB"
            if colorspace in ("YCbCr", "RGB") and (w, h) == vit_resized_size(w, h, size):
                return data, w, h
    # Over Pillow's pixel limit (validate's default --max-pixels too): what validation calls a
    # decompression bomb is an error here, not a warning printed by each worker; pack drops the sample and
    # counts it under that reason (a catalog validated with --meta-only never had its pixels checked).
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
    with img:
        w, h = img.size
        nw, nh = vit_resized_size(w, h, size)
        if img.format == "JPEG" and img.mode == "RGB" and (w, h) == (nw, nh):
            return data, w, h
        if img.format == "JPEG" and min(w / nw, h / nh) >= 2:
            img.draft("RGB", (nw, nh))  # decode at a DCT scale still >= the target: much less work
        rgb = img.convert("RGB") if img.mode != "RGB" else img
        rgb.load()
        out = rgb.resize((nw, nh), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), nw, nh


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
        self._add(f"{rec.key}.input_ids.npy", npy_bytes(rec.input_ids.astype(np.int32)))
        self._add(f"{rec.key}.labels.npy", npy_bytes(rec.labels.astype(np.int32)))
        self._add(f"{rec.key}.lengths.npy", npy_bytes(rec.lengths.astype(np.int32)))
        for i, jpg in enumerate(rec.images):
            self._add(f"{rec.key}.img_{i:03d}.jpg", jpg)
        self._add(f"{rec.key}.json", json.dumps(rec.meta, sort_keys=True, ensure_ascii=False).encode())
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


class ShardError(Exception):
    """A packed shard that cannot be read as its manifest describes: names the shard and the record."""

    def __init__(self, shard: Path | str, record: int | None, reason: str):
        self.shard, self.record, self.reason = str(shard), record, reason
        where = f"{self.shard}: record {record}" if record is not None else self.shard
        super().__init__(f"{where}: {reason}")


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
    if ext.endswith(".npy"):
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
        base = name.rsplit("/", 1)[-1]
        k, _, ext = base.partition(".")
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


def supervised_targets(labels: np.ndarray, lengths: np.ndarray) -> int:
    """Supervised next-token targets of a packed record: labels != -100 except at each sub-sample's first
    position (no token before it in that sub-sample predicts it). Image placeholders carry -100 labels, and
    the visual tokens they expand to are never supervised, so the count is the same expanded or not."""
    mask = np.asarray(labels) != IGNORE_ID
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))[np.asarray(lengths) > 0]
    mask[starts] = False
    return int(mask.sum())
