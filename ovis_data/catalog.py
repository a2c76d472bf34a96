"""Catalogs: one parquet of good samples per dataset (what pack reads), plus the rejected rows beside it.

Columns: dataset, row (0-based row in the meta file), id (original, or '<dataset>-<row>'), images
(list of paths under image_dir, in placeholder order), roles/texts (conversation) or caption, and
widths/heights of the images (null when only the meta file was checked).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import OvisDataError

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
REJECTED_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("row", pa.int64()),
        ("id", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


def catalog_dir(root: Path, override: Path | None = None) -> Path:
    return Path(override) if override is not None else Path(root) / CATALOG_DIR


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


def catalog_check_mode(path: Path) -> str | None:
    """How deeply the catalog's images were checked: 'meta', 'header' or 'deep'."""
    meta = pq.read_schema(path).metadata or {}
    value = meta.get(b"ovis_check")
    return value.decode() if value else None
