"""What of each registered dataset is present under a data root (for `ovis-data list`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .imagestore import is_shard_dir
from .registry import DatasetSpec
from .sources import source_summary


@dataclass(frozen=True)
class InventoryRow:
    name: str
    stage: int
    data_format: str
    meta_status: str
    image_status: str
    source: str


def _image_status(spec: DatasetSpec, root: Path | None) -> str:
    if spec.image_dir is None:
        return "text only"
    if root is None:
        return spec.image_dir
    path = spec.image_path(root)
    if not path.is_dir():
        return f"missing ({spec.image_dir})"
    return f"present, {'shards' if is_shard_dir(path) else 'files'} ({spec.image_dir})"


def inventory(registry: dict[str, DatasetSpec], root: Path | None) -> list[InventoryRow]:
    rows = []
    for spec in registry.values():
        if root is None:
            meta = spec.meta_file
        else:
            meta = ("present" if spec.meta_path(root).is_file() else "missing") + f" ({spec.meta_file})"
        source = source_summary(spec.source)  # where `ovis-data get` gets it, and its recorded size
        if spec.url_source:
            source += "; images: ovis-data fetch"
        rows.append(
            InventoryRow(spec.name, spec.stage, spec.data_format, meta, _image_status(spec, root), source)
        )
    return rows
