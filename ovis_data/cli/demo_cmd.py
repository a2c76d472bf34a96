"""`ovis-data demo`: the whole pipeline on the built-in corpus, on one CPU, in minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..demo import run_demo
from .app import app
from .common import console


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo corpus and everything made from it.")] = Path(
        "demo_out"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the corpus generator.")] = 0,
) -> None:
    """Build the built-in corpus of all 19 datasets (with deliberately broken samples) and validate it.

    The broken samples are expected: the summary shows each one with its reason.
    """
    summary = run_demo(out, seed=seed, console=console)
    console.print(summary)
