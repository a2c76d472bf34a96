"""`ovis-data pack` and `ovis-data inspect`: argument parsing only; the work is in ovis_data.pack/inspect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..inspect import inspect_record, render_rich
from ..pack import PACKS_PER_SHARD, pack_stage
from ..recipes import select_recipe
from .app import app
from .common import InfoOption, RecipeOption, RootOption, console


@app.command("pack")
def pack(
    tokenizer: Annotated[Path, typer.Option(help="Directory of the LLM's (fast) tokenizer.")],
    out: Annotated[Path, typer.Option(help="Output folder; shards go to OUT/stageN/.")],
    stage: Annotated[
        int | None, typer.Option("--stage", help="Stage to pack (its recipe pipelines/stageN.toml).")
    ] = None,
    recipe: RecipeOption = None,
    root: RootOption = None,
    max_length: Annotated[
        int | None, typer.Option(help="Tokens per packed sequence (default: the recipe's max_length).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the shuffle, packing and subsampling.")] = 0,
    processes: Annotated[int | None, typer.Option(help="Worker processes (default: all cores).")] = None,
    visual_tokens: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Visual tokens per image; must equal the model's num_visual_tokens "
            "(default: the recipe's visual_tokens, 578 for Ovis v1).",
        ),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(min=1, help="Longer side of the stored images (default: the recipe's image_size)."),
    ] = None,
    packs_per_shard: Annotated[int, typer.Option(help="Packed sequences per tar shard.")] = PACKS_PER_SHARD,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace shards packed earlier from other inputs.")
    ] = False,
    dataset_info: InfoOption = None,
) -> None:
    """Pack a stage's validated samples into webdataset shards of fixed-capacity sequences.

    Runs validation first for datasets without a catalog. A killed run resumes where it stopped; the same
    inputs and seed give byte-identical shards whatever --processes.

    Example: ovis-data pack --stage 3 --root /data/ovis --tokenizer /models/Qwen2.5-7B --out /data/packed

    Your own datasets: ovis-data pack --recipe my_recipe.toml --dataset-info my_info.json ... (the recipe's
    `stage` names the folder: OUT/stageN)
    """
    chosen, registry = select_recipe(stage, recipe, dataset_info)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        tasks: dict[str, int] = {}

        def on_progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        manifest = pack_stage(
            chosen,
            root,
            tokenizer,
            out,
            max_length=max_length,
            seed=seed,
            processes=processes,
            visual_tokens=visual_tokens,
            image_size=image_size,
            packs_per_shard=packs_per_shard,
            overwrite=overwrite,
            registry=registry,
            progress=on_progress,
        )
    n = manifest["stage"]
    table = Table(title=f"stage {n} packed into {Path(out) / f'stage{n}'}")
    for col in ("dataset", "catalog", "selected", "packed", "dropped"):
        table.add_column(col, justify="left" if col in ("dataset", "dropped") else "right")
    for name, d in manifest["datasets"].items():
        dropped = ", ".join(f"{k} {v}" for k, v in d["dropped"].items()) or "-"
        table.add_row(name, str(d["catalog"]), str(d["selected"]), str(d["packed"]), dropped)
    console.print(table)
    console.print(
        f"{manifest['records']:,} sequences of {manifest['capacity']} tokens in {len(manifest['shards'])} "
        f"shards, fill {manifest['fill']:.2%}; dropped: "
        + (", ".join(f"{k} {v}" for k, v in manifest["dropped"].items()) or "none")
    )


@app.command("inspect")
def inspect(
    shard: Annotated[Path, typer.Argument(help="A packed shard (OUT/stageN/stageN-NNNNN.tar).")],
    record: Annotated[str, typer.Option(help="Record number (0-based) or key.")] = "0",
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer to decode with (default: the one in manifest.json).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Decode one packed record: each sub-sample's text with supervised spans highlighted, image positions
    marked, and where it came from (dataset, row, id)."""
    which: int | str = int(record) if record.isdigit() else record
    view = inspect_record(shard, which, tokenizer)
    if as_json:
        typer.echo(json.dumps(view, ensure_ascii=False, indent=1))
    else:
        console.print(render_rich(view))
