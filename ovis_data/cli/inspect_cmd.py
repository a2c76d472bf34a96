"""`ovis-data inspect`: argument parsing only; the work is in ovis_data.pack.inspect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..pack.inspect import inspect_record, render_rich
from .app import app
from .common import console


@app.command("inspect")
def inspect(
    shard: Annotated[
        Path, typer.Argument(metavar="SHARD", help="A packed shard (OUT/stageN/stageN-NNNNN.tar).")
    ],
    record: Annotated[str, typer.Option(metavar="K", help="Record number (0-based) or key.")] = "0",
    tokenizer: Annotated[
        Path | None,
        typer.Option(metavar="DIR", help="Tokenizer to decode with (default: the one in manifest.json)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Decode one packed record: each sub-sample's text with its supervised spans marked (green, or
    [[...]] without colour), image positions, and where it came from (dataset, row, id).

    Example:
        ovis-data inspect demo_out/packed/stage3/stage3-00000.tar --record 1
    """
    which: int | str = int(record) if record.isdigit() else record
    view = inspect_record(shard, which, tokenizer)
    if as_json:
        typer.echo(json.dumps(view, ensure_ascii=False, indent=1))
    else:
        console.print(render_rich(view, plain=console.color_system is None), soft_wrap=False)
