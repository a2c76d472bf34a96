"""`ovis-data list`: the datasets, their stage and format, and what is present under the root."""

from __future__ import annotations

import os

from rich.table import Table

from ..inventory import inventory
from ..registry import ROOT_ENV, load_registry, resolve_root
from .app import app
from .common import InfoOption, RootOption, console


@app.command("list")
def list_datasets(root: RootOption = None, dataset_info: InfoOption = None) -> None:
    """Show every dataset of the registry: stage, format, and whether its meta file and images are present.

    Without --root (or $OVIS_DATA_ROOT) only the registry is shown.
    """
    registry = load_registry(dataset_info)
    base = resolve_root(root) if (root is not None or os.environ.get(ROOT_ENV)) else None
    table = Table(title=f"Ovis datasets ({len(registry)})" + (f" under {base}" if base else ""))
    for col in ("name", "stage", "format", "meta file", "image dir", "source"):
        table.add_column(col)
    for row in inventory(registry, base):
        table.add_row(
            row.name, str(row.stage), row.data_format, row.meta_status, row.image_status, row.source
        )
    console.print(table)
