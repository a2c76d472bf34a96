"""Catalogs: one parquet of good samples per dataset (what pack reads), plus the rejected rows beside it.

Columns: dataset, row (0-based row in the meta file), id (original, or '<dataset>-<row>'), images
(list of paths under image_dir, in placeholder order), roles/texts (conversation) or caption, and
widths/heights of the images (null when only the meta file was checked). The parquet metadata records
how deeply images were checked (`ovis_check`) and what the catalog was made from (`ovis_source`: the meta
file's path, size, mtime and sha256, and the image store's layout, image count and names hash).
The rejected rows: dataset, row, id, reason, detail, and images (the paths the meta file gave, when
it gave any).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OvisDataError
from ..storage import AnyPath, RemotePath, as_path, open_binary

CATALOG_DIR = "catalogs"
CATALOG_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("row", pa.int64()),
        ("id", pa.string()),
        ("images", pa.list_(pa.string())),
        ("roles", pa.list_(pa.string())),
        ("texts", pa.list_(pa.string())),
        ("caption", pa.string()),
        ("widths", pa.list_(pa.int32())),
        ("heights", pa.list_(pa.int32())),
    ]
)


def catalog_dir(root: AnyPath, override: AnyPath | None = None) -> AnyPath:
    return as_path(override) if override is not None else as_path(root) / CATALOG_DIR


def catalog_path(root: Path, name: str, override: Path | None = None) -> Path:
    return catalog_dir(root, override) / f"{name}.parquet"


def rejected_path(root: Path, name: str, override: Path | None = None) -> Path:
    return catalog_dir(root, override) / f"{name}.rejected.parquet"


def read_catalog(root: Path, name: str, override: Path | None = None) -> pa.Table:
    """The good samples of one dataset; a clear error when validate has not written it yet."""
    path = catalog_path(root, name, override)
    if not path.exists():
        raise OvisDataError(f"{path}: no catalog for {name!r}; run `ovis-data validate {name}` first")
    return pq.read_table(path, schema=CATALOG_SCHEMA)


def meta_file_identity(path: Path) -> dict:
    """What a catalog records of the meta file it was made from: size, mtime and a content hash."""
    st = as_path(path).stat()
    with open_binary(path) as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}


def catalog_source(path: Path) -> dict | None:
    """The `ovis_source` a catalog was written with (None for catalogs of older versions)."""
    if isinstance(path, RemotePath):
        schema = pq.read_schema(path.path, filesystem=path.fs)
    else:
        schema = pq.read_schema(path)
    value = (schema.metadata or {}).get(b"ovis_source")
    return json.loads(value) if value else None


def check_catalog_current(path: Path, name: str, meta_path: Path) -> None:
    """Refuse a catalog whose meta file changed since validate wrote it (or that does not say).

    Same size and mtime: unchanged; same size, other mtime: the content hash decides (a copy or a touch
    is not a change).
    """
    rerun = f"re-run `ovis-data validate {name}`"
    source = catalog_source(path)
    recorded = (source or {}).get("meta_file")
    if not recorded:
        raise OvisDataError(
            f"{path}: catalog of {name!r} does not record its meta file (older version): {rerun}"
        )
    meta_path = as_path(meta_path)
    if not meta_path.is_file():
        raise OvisDataError(f"{path}: the meta file of {name!r} is gone ({meta_path}): {rerun}")
    st = meta_path.stat()
    same = st.st_size == recorded["size"] and (
        st.st_mtime_ns == recorded["mtime_ns"]
        or meta_file_identity(meta_path)["sha256"] == recorded["sha256"]
    )
    if not same:
        raise OvisDataError(
            f"{path}: catalog of {name!r} is stale: {meta_path} changed since it was validated: {rerun}"
        )
