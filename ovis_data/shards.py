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
import tarfile
from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .templates import IGNORE_ID

JPEG_QUALITY = 95


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
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        if w >= h:
            nw, nh = size, max(1, int(h / w * size))
        else:
            nw, nh = max(1, int(w / h * size)), size
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


class ShardWriter:
    """Writes records into `path` atomically: `path.tmp` while open, renamed by close()."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(  # noqa: SIM115 - closed in close()
            fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT
        )
        self.records = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

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
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return self._hashing.sha.hexdigest(), self._hashing.size

    def abort(self) -> None:
        self._tar.close()
        self._file.close()
        self.tmp.unlink(missing_ok=True)


class ShardError(Exception):
    """A packed shard that cannot be read as its manifest describes: names the shard and the record."""

    def __init__(self, shard: Path | str, record: int | None, reason: str):
        self.shard, self.record, self.reason = str(shard), record, reason
        where = f"{self.shard}: record {record}" if record is not None else self.shard
        super().__init__(f"{where}: {reason}")


def _fill(rec: Record, ext: str, data: bytes) -> None:
    if ext.endswith(".npy"):
        setattr(rec, ext[: -len(".npy")], np.load(io.BytesIO(data), allow_pickle=False))
    elif ext.startswith("img_"):
        rec.images.append(data)
    elif ext == "json":
        rec.meta = json.loads(data)


def iter_records(
    path: Path | str, wanted: Container[int] | None = None, stop_after: int | None = None
) -> Iterator[tuple[int, Record]]:
    """(index, record) of a shard's records in order; only the `wanted` indices are read (the others'
    members are skipped by seeking past them), and reading stops after record `stop_after`.

    Any damage (truncated or corrupt tar, unreadable array or JSON) raises ShardError naming the shard
    and the record it hit.
    """
    empty = np.zeros(0, dtype=np.int32)
    index, key, current = -1, None, None
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
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
                    member = tf.extractfile(m)
                    data = member.read() if member is not None else b""
                    if len(data) != m.size:
                        raise ShardError(
                            path, index, f"member {m.name} truncated ({len(data)} of {m.size} bytes)"
                        )
                    _fill(current, ext, data)
            if current is not None:
                yield index, current
    except ShardError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:  # ValueError: np.load / json
        raise ShardError(path, max(index, 0), f"{type(e).__name__}: {e}") from e


def read_records(path: Path) -> Iterator[Record]:
    """The records of a shard, in order (plain tarfile: no webdataset needed)."""
    for _, rec in iter_records(path):
        yield rec


def supervised_mask(labels: np.ndarray) -> np.ndarray:
    return labels != IGNORE_ID
