"""Options and output helpers shared by the CLI commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

RootOption = Annotated[
    Path | None,
    typer.Option("--root", help="Data root holding meta_files/ and images/ (default: $OVIS_DATA_ROOT)."),
]
InfoOption = Annotated[
    Path | None,
    typer.Option("--dataset-info", help="Your own dataset_info.json instead of the shipped 19 datasets."),
]
