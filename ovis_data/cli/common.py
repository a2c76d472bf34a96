"""Options and output helpers shared by the CLI commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

RootOption = Annotated[
    str | None,  # a folder, or an object-store URL (s3://bucket/prefix): not a Path, which mangles '//'
    typer.Option(
        "--root",
        help="Data root holding meta_files/ and images/: a folder or s3://bucket/prefix (default: "
        "$OVIS_DATA_ROOT).",
    ),
]
InfoOption = Annotated[
    Path | None,
    typer.Option(
        "--dataset-info",
        metavar="FILE",
        help="Your own dataset_info.json instead of the shipped 19 datasets; a recipe's datasets "
        "(--recipe, pack --stage) are looked up in both, yours first.",
    ),
]
RecipeOption = Annotated[
    Path | None,
    typer.Option(
        "--recipe",
        metavar="FILE",
        help="Your own recipe (datasets, weights, lengths, training) instead of --stage N's shipped one.",
    ),
]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress display (it shows only on a terminal anyway).")
]
