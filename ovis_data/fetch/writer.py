"""Atomic writers for one shard of rows, in either image-store layout.

Nothing is ever written in place: bytes go to a temporary name under `.fetch/tmp/` (same filesystem),
then `os.replace` moves them into view. A shard is finished only when its `_stats.json` exists, and that
file is always written last, so a run killed at any instant leaves only whole files and unfinished
shards that the next run redoes.

files:  image_dir/<image_path>; the shard's status in .fetch/NNNNN.parquet and .fetch/NNNNN_stats.json
shards: image_dir/NNNNN.tar, NNNNN.parquet, NNNNN_stats.json (img2dataset's webdataset output)
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..imagestore import unsafe_path_reason, write_shard_index
from .frames import write_all

BOOKKEEPING = ".fetch"
TAR_MTIME = 0  # fixed member mtime: the same images give the same tar bytes

STATUS_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("key", pa.string()),
        ("image_path", pa.string()),
        ("url", pa.string()),
        ("status", pa.string()),  # "success" or "failed"
        ("error_class", pa.string()),  # null on success
        ("error_message", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("original_size", pa.int64()),
        ("original_sha256", pa.string()),
        ("attempts", pa.int32()),
    ]
)


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def status_dir(image_dir: Path, layout: str) -> Path:
    """Where a layout keeps its per-shard NNNNN.parquet and NNNNN_stats.json."""
    return image_dir if layout == "shards" else image_dir / BOOKKEEPING


def done_marker(image_dir: Path, layout: str, shard_id: int) -> Path:
    return status_dir(image_dir, layout) / f"{shard_name(shard_id)}_stats.json"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFiles:
    """Writes whole files via a private temporary directory; `clean()` drops what a killed run left."""

    def __init__(self, tmp_dir: Path) -> None:
        self.tmp_dir = tmp_dir
        self._n = 0

    def clean(self) -> None:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        for p in self.tmp_dir.iterdir():
            p.unlink()

    def temp(self, name: str) -> Path:
        self._n += 1
        return self.tmp_dir / f"{self._n}-{name}"

    def write(self, path: Path, data: bytes, durable: bool = False) -> None:
        tmp = self.temp(path.name)
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)

    def write_parquet(self, path: Path, table: pa.Table) -> None:
        tmp = self.temp(path.name)
        pq.write_table(table, tmp)
        fsync_path(tmp)
        os.replace(tmp, path)

    def write_json(self, path: Path, obj: Any) -> None:
        self.write(path, json.dumps(obj, indent=1, sort_keys=True).encode(), durable=True)


def status_table(records: list[dict[str, Any]]) -> pa.Table:
    records = sorted(records, key=lambda r: r["row"])
    return pa.Table.from_pylist(records, schema=STATUS_SCHEMA)


class FilesShard:
    """files layout: each image lands at image_dir/<image_path> as soon as it is ready."""

    def __init__(self, image_dir: Path, shard_id: int, atomic: AtomicFiles, durable: bool) -> None:
        self.image_dir = image_dir
        self.shard_id = shard_id
        self.atomic = atomic
        self.durable = durable
        self._real_root = os.path.realpath(image_dir)

    def add(self, key: str, image_path: str, ext: str, data: bytes, meta: dict[str, Any]) -> None:
        if unsafe_path_reason(image_path):
            raise PermissionError(f"{image_path!r} escapes the image directory")
        target = self.image_dir / image_path
        real_parent = os.path.realpath(target.parent)
        if not (real_parent == self._real_root or real_parent.startswith(self._real_root + os.sep)):
            raise PermissionError(f"{image_path!r} links out of the image directory")
        self.atomic.write(target, data)

    def finish(self, records: list[dict[str, Any]], stats: dict[str, Any]) -> None:
        if self.durable:
            os.sync()  # one flush for the whole shard, before its done-marker promises the images
        sdir = status_dir(self.image_dir, "files")
        self.atomic.write_parquet(sdir / f"{shard_name(self.shard_id)}.parquet", status_table(records))
        self.atomic.write_json(sdir / f"{shard_name(self.shard_id)}_stats.json", stats)

    def abort(self) -> None:
        pass


def _header_template() -> tuple[bytes, int]:
    info = tarfile.TarInfo("")
    info.mtime = TAR_MTIME
    info.mode = 0o644
    tpl = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    # Checksum of every byte outside the name, size and checksum fields (the latter counts as spaces).
    return tpl, sum(tpl[100:124]) + sum(tpl[136:148]) + 8 * 32 + sum(tpl[156:512])


_TEMPLATE, _TEMPLATE_SUM = _header_template()
_ZEROS = bytes(tarfile.BLOCKSIZE)


def tar_header(name: str, size: int) -> bytes:
    """The GNU tar header TarInfo.tobuf writes for a regular member (mode 644, mtime TAR_MTIME, uid and
    gid 0, utf-8 names) from a template: only the name, size and checksum change. tobuf's generic field
    formatting cost ~40 us a member, a sizeable share of the main process's time per image."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) >= 100 or size >= 8**11:  # long names and huge sizes need GNU extension blocks
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, TAR_MTIME, 0o644
        return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size
    chksum = _TEMPLATE_SUM + sum(raw) + sum(size_field)
    return b"".join(
        (
            raw,
            bytes(100 - len(raw)),
            _TEMPLATE[100:124],
            size_field,
            _TEMPLATE[136:148],
            b"%06o\0" % chksum,
            _TEMPLATE[155:],
        )
    )


class TarShard:
    """shards layout: members `<key>.<ext>` + `<key>.json` streamed into a temporary tar. The offset of
    each image is known as it is written, so the shard's index is saved beside it, never re-read."""

    def __init__(self, image_dir: Path, shard_id: int, atomic: AtomicFiles, durable: bool) -> None:
        self.image_dir = image_dir
        self.shard_id = shard_id
        self.atomic = atomic
        self.durable = durable
        self.name = shard_name(shard_id)
        self.tmp = atomic.temp(f"{self.name}.tar")
        self._file = open(self.tmp, "wb", buffering=0)  # noqa: SIM115 (spans the shard; writev below)
        self._offset = 0
        self._index: list[tuple[str, int, int]] = []  # (image_path, data offset, size)

    def copy_from(self, old_tar: Path) -> None:
        """Start from an existing shard's members (retry-failed adds to a finished shard)."""
        images: dict[str, tuple[int, int]] = {}
        paths: dict[str, str] = {}
        with tarfile.open(old_tar) as old:
            for m in old:
                if not m.isfile():
                    continue
                data = old.extractfile(m).read()  # type: ignore[union-attr]
                (offset,) = self._members([(m.name, data)])
                key, ext = posixpath.splitext(m.name)
                if ext == ".json":
                    paths[key] = json.loads(data).get("image_path")
                else:
                    images[key] = (offset, len(data))
        self._index.extend((paths[k], *images[k]) for k in images if paths.get(k))

    def _members(self, members: list[tuple[str, bytes]]) -> list[int]:
        """Append members in one writev (no join copy of the image); return where each one's data starts."""
        parts: list[bytes] = []
        starts = []
        offset = self._offset
        for name, data in members:
            header = tar_header(name, len(data))
            pad = -len(data) % tarfile.BLOCKSIZE
            parts += (header, data, _ZEROS[:pad])
            starts.append(offset + len(header))
            offset += len(header) + len(data) + pad
        write_all(self._file.fileno(), parts)
        self._offset = offset
        return starts

    def add(self, key: str, image_path: str, ext: str, data: bytes, meta: dict[str, Any]) -> None:
        # Image first, then its json: members of a sample are adjacent (webdataset's grouping).
        meta_bytes = json.dumps(meta, sort_keys=True).encode()
        start, _ = self._members([(f"{key}.{ext}", data), (f"{key}.json", meta_bytes)])
        self._index.append((image_path, start, len(data)))

    def finish(self, records: list[dict[str, Any]], stats: dict[str, Any]) -> None:
        end = 2 * tarfile.BLOCKSIZE  # end-of-archive, then pad to a record, as tarfile does
        end += -(self._offset + end) % tarfile.RECORDSIZE
        write_all(self._file.fileno(), [bytes(end)])
        self._offset += end
        self._file.close()
        if self.durable:
            fsync_path(self.tmp)
        os.replace(self.tmp, self.image_dir / f"{self.name}.tar")
        paths, offsets, sizes = zip(*self._index, strict=False) if self._index else ((), (), ())
        part = pa.table(
            {
                "image_path": pa.array(paths, pa.string()),
                "offset": pa.array(offsets, pa.int64()),
                "size": pa.array(sizes, pa.int64()),
            }
        )
        write_shard_index(self.image_dir, self.name, part)  # before the done-marker, like the tar
        self.atomic.write_parquet(self.image_dir / f"{self.name}.parquet", status_table(records))
        self.atomic.write_json(self.image_dir / f"{self.name}_stats.json", stats)

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)
