"""`ovis-data list`: the datasets, their stage and format, and what is present under the root."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..clikit import expect_file, print_table
from ..inventory import inventory
from ..recipes import describe_recipe, select_recipe
from ..registry import ROOT_ENV, load_registry, resolve_root
from .app import app
from .common import InfoOption, RecipeOption, RootOption, console


@app.command("list")
def list_datasets(
    root: RootOption = None,
    dataset_info: InfoOption = None,
    stage: Annotated[
        int | None, typer.Option("--stage", help="Show what the shipped recipe of this stage would use.")
    ] = None,
    recipe: RecipeOption = None,
) -> None:
    """Show every dataset of the registry: stage, format, and whether its meta file and images are present.

    Without --root (or $OVIS_DATA_ROOT) only the registry is shown. With --stage N or --recipe FILE: what
    that recipe would use (its datasets and weights, lengths, DeepSpeed config, training settings).

    Examples (everything under a root; what stage 3's recipe would use; your own recipe and datasets):
        ovis-data list --root /data/ovis
        ovis-data list --stage 3
        ovis-data list --recipe my_recipe.toml --dataset-info my_info.json --root /data/mine
    """
    expect_file(dataset_info, "--dataset-info")
    expect_file(recipe, "--recipe")
    base = resolve_root(root) if (root is not None or os.environ.get(ROOT_ENV)) else None
    if stage is not None or recipe is not None:
        _show_recipe(stage, recipe, dataset_info, base)
        return
    registry = load_registry(dataset_info)
    table = Table(title=f"Ovis datasets ({len(registry)})" + (f" under {base}" if base else ""))
    for col in ("name", "stage", "format", "meta file", "image dir", "source"):
        table.add_column(col)
    for row in inventory(registry, base):
        table.add_row(
            row.name, str(row.stage), row.data_format, row.meta_status, row.image_status, row.source
        )
    print_table(console, table)


def _show_recipe(stage: int | None, recipe: Path | None, info: Path | None, base: Path | None) -> None:
    chosen, registry = select_recipe(stage, recipe, info)
    own = load_registry(info) if info is not None else {}
    settings = Table(title=f"recipe {chosen.path.name}", show_header=False)
    settings.add_column(style="bold")
    settings.add_column()
    for what, value in describe_recipe(chosen):
        settings.add_row(what, value)
    print_table(console, settings)
    table = Table(title=f"its datasets ({len(chosen.datasets)})" + (f" under {base}" if base else ""))
    table.add_column("name", no_wrap=True)
    for col in ("weight", "format", "meta file", "image dir") + (("registered in",) if own else ()):
        table.add_column(col)
    rows = inventory({m.name: registry[m.name] for m in chosen.datasets}, base)
    for mix, row in zip(chosen.datasets, rows, strict=True):
        fmt = row.data_format
        if fmt == "caption":
            fmt += f" ({mix.caption_template or registry[mix.name].caption_template!r})"
        cells = [row.name, f"{mix.weight:g}", fmt, row.meta_status, row.image_status]
        table.add_row(*cells, *([str(info) if mix.name in own else "shipped"] if own else []))
    print_table(console, table)
