"""One reader for both image layouts: plain files under image_dir, or img2dataset-style tar shards + index.

files:  image_dir/<image_path>, exactly as the meta file names it.
shards: image_dir/NNNNN.tar (members <key>.jpg + <key>.json with image_path), NNNNN.parquet,
        NNNNN_stats.json (written last: the shard's done-marker) and index.parquet mapping
        image_path -> (tar, offset, size) for O(1) reads.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

INDEX_NAME = "index.parquet"
INDEX_SCHEMA = pa.schema(
    [("image_path", pa.string()), ("tar", pa.string()), ("offset", pa.int64()), ("size", pa.int64())]
)
FETCH_BOOKKEEPING = ".fetch"  # image_dir/.fetch/: `ovis-data fetch` bookkeeping, never an image
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def unsafe_path_reason(image_path: str) -> str | None:
    """Why a meta-file image path may not be opened (it would escape image_dir), or None when it is safe."""
    if not image_path:
        return "empty path"
    if image_path.startswith(("/", "\\")) or (len(image_path) > 1 and image_path[1] == ":"):
        return "absolute path"
    if "\x00" in image_path:
        return "NUL byte in path"
    parts = image_path.replace("\\", "/").split("/")
    if ".." in parts:
        return "'..' segment"
    return None


class ImageStore:
    """Images of one image_dir, whichever layout fetch (or a publisher's archive) left there."""

    def __init__(self, image_dir: Path):
        self.image_dir = Path(image_dir)
        self._real_root = os.path.realpath(self.image_dir)
        self.layout = "shards" if is_shard_dir(self.image_dir) else "files"
        self._index: dict[str, tuple[str, int, int]] | None = None
        self._tars: dict[str, object] = {}

    # -- listing ------------------------------------------------------------------------------------
    def listing(self) -> pa.Table:
        """Every image present, as a table (image_path, linked_out): no per-file stat, one directory walk."""
        if self.layout == "shards":
            index = load_index(self.image_dir)
            paths = index.column("image_path")
            return pa.table({"image_path": paths, "linked_out": pa.array([False] * len(paths))})
        paths: list[str] = []
        linked_out: list[bool] = []
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
                        if name != FETCH_BOOKKEEPING:  # fetch's status files and temporaries
                            stack.append(name)
                    else:
                        paths.append(name)
                        linked_out.append(False)
        return pa.table({"image_path": pa.array(paths, pa.string()), "linked_out": pa.array(linked_out)})

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
        if not self._inside(str(path)):
            raise PermissionError(f"{image_path!r}: link out of {self.image_dir}")
        return path

    def read_bytes(self, image_path: str) -> bytes:
        if self.layout == "files":
            return self.file_path(image_path).read_bytes()
        if self._index is None:
            t = load_index(self.image_dir)
            self._index = {
                p: (tar, off, size)
                for p, tar, off, size in zip(
                    t.column("image_path").to_pylist(),
                    t.column("tar").to_pylist(),
                    t.column("offset").to_pylist(),
                    t.column("size").to_pylist(),
                    strict=True,
                )
            }
        try:
            tar, offset, size = self._index[image_path]
        except KeyError as e:
            raise FileNotFoundError(f"{image_path!r} not in {self.image_dir / INDEX_NAME}") from e
        return read_range(self.image_dir / tar, offset, size)


def read_range(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path}: short read at offset {offset} ({len(data)} of {size} bytes)")
    return data


def is_shard_dir(image_dir: Path) -> bool:
    """A shards layout has an index or at least one finished shard (its _stats.json done-marker)."""
    if (image_dir / INDEX_NAME).exists():
        return True
    return image_dir.is_dir() and any(image_dir.glob("*_stats.json"))


def load_index(image_dir: Path) -> pa.Table:
    """The image_path -> (tar, offset, size) index; built from the finished shards when absent or stale."""
    path = image_dir / INDEX_NAME
    if path.exists():
        table = pq.read_table(path)
        covered = json.loads((table.schema.metadata or {}).get(b"shards", b"null"))
        if covered == _finished_shards(image_dir):
            return table
    return build_index(image_dir)


def _finished_shards(image_dir: Path) -> list[str]:
    return sorted(p.name[: -len("_stats.json")] for p in image_dir.glob("*_stats.json"))


def build_index(image_dir: Path) -> pa.Table:
    """Scan every finished tar once for member offsets and write index.parquet atomically."""
    rows: dict[str, list] = {"image_path": [], "tar": [], "offset": [], "size": []}
    shards = _finished_shards(image_dir)
    for shard in shards:
        tar_path = image_dir / f"{shard}.tar"
        if not tar_path.exists():
            continue
        members: dict[str, tarfile.TarInfo] = {}
        metas: dict[str, str] = {}
        with tarfile.open(tar_path) as tf:
            for m in tf:
                key, ext = posixpath.splitext(m.name)
                if ext == ".json":
                    meta = json.loads(tf.extractfile(m).read())
                    if meta.get("image_path"):
                        metas[key] = meta["image_path"]
                elif ext.lower() in IMAGE_EXTS:
                    members[key] = m
        for key, m in members.items():
            if key in metas:
                rows["image_path"].append(metas[key])
                rows["tar"].append(tar_path.name)
                rows["offset"].append(m.offset_data)
                rows["size"].append(m.size)
    schema = INDEX_SCHEMA.with_metadata({"shards": json.dumps(shards)})
    table = pa.table(rows, schema=schema)
    tmp = image_dir / f".{INDEX_NAME}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, image_dir / INDEX_NAME)
    return table
