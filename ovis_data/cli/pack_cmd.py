"""`ovis-data pack`: argument parsing only; the work is in ovis_data.pack."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..clikit import ProgressDisplay, expect_dir_or_creatable, expect_file, print_table
from ..pack.stage import PACKS_PER_SHARD, pack_stage
from ..recipes import select_recipe
from ..report.hint import report_hint
from ..storage import as_path
from .app import app
from .common import InfoOption, QuietOption, RecipeOption, RootOption, console

# pack_stage's phases as the progress display names them: (label, unit of the rate)
PHASES = {"tokenize": ("samples tokenized", "samples"), "write": ("records written", "records")}


@app.command("pack")
def pack(
    tokenizer: Annotated[Path, typer.Option(help="Directory of the LLM's (fast) tokenizer.")],
    out: Annotated[str, typer.Option(help="Output folder or s3://bucket/prefix; shards go to OUT/stageN/.")],
    stage: Annotated[
        int | None, typer.Option("--stage", help="Stage to pack (its recipe pipelines/stageN.toml).")
    ] = None,
    recipe: RecipeOption = None,
    root: RootOption = None,
    max_length: Annotated[
        int | None, typer.Option(help="Tokens per packed sequence (default: the recipe's max_length).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the shuffle, packing and subsampling.")] = 0,
    processes: Annotated[
        int | None,
        typer.Option(help="Worker processes (default: all cores; this process alone for a small stage)."),
    ] = None,
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
    holdout: Annotated[
        float,
        typer.Option(
            metavar="FRACTION",
            help="Share of each dataset's selected samples kept out of training, packed into OUT/stageN/val/ "
            "(chosen by a hash of the sample id and --seed).",
        ),
    ] = 0.0,
    dataset_info: InfoOption = None,
    quiet: QuietOption = False,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help="Tokenize and write shards as Ray tasks: auto (this node's cluster), local or host:port; "
            "--out on storage every node sees. Same shards as without. Needs the ray extra.",
        ),
    ] = None,
) -> None:
    """Pack a stage's validated samples into webdataset shards of fixed-capacity sequences.

    Runs validation first for datasets without a catalog. A killed run resumes where it stopped; the same
    inputs and seed give byte-identical shards whatever --processes.

    Example:
        ovis-data pack --stage 3 --root /data/ovis --tokenizer /models/Qwen2.5-7B --out /data/packed

    Your own datasets (the recipe's `stage` names the folder: OUT/stageN):
        ovis-data pack --recipe my_recipe.toml --dataset-info my_info.json --tokenizer /models/qwen --out OUT
    """
    expect_file(dataset_info, "--dataset-info")
    expect_file(recipe, "--recipe")
    expect_dir_or_creatable(out, "--out")
    chosen, registry = select_recipe(stage, recipe, dataset_info)
    with ProgressDisplay(quiet) as shown:

        def on_progress(phase: str, done: int, total: int) -> None:
            label, unit = PHASES.get(phase, (phase, ""))
            shown.update(label, done, total, unit)

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
            ray=ray,
            holdout=holdout,
        )
    n = manifest["stage"]
    table = Table(title=f"stage {n} packed into {as_path(out) / f'stage{n}'}")
    for col in ("dataset", "catalog", "selected", "packed", "dropped"):
        table.add_column(col, justify="left" if col in ("dataset", "dropped") else "right")
    for name, d in manifest["datasets"].items():
        dropped = ", ".join(f"{k} {v}" for k, v in d["dropped"].items()) or "-"
        table.add_row(name, str(d["catalog"]), str(d["selected"]), str(d["packed"]), dropped)
    print_table(console, table)
    console.print(
        f"{manifest['records']:,} sequences of {manifest['capacity']} tokens in {len(manifest['shards'])} "
        f"shards, fill {manifest['fill']:.2%}; dropped: "
        + (", ".join(f"{k} {v}" for k, v in manifest["dropped"].items()) or "none")
    )
    if holdout:
        held = sum(d.get("held_out", 0) for d in manifest["datasets"].values())
        console.print(f"{held:,} samples held out for validation in {as_path(out) / f'stage{n}' / 'val'}")
    hint = report_hint(root, stage=stage, recipe=recipe, packed=out, dataset_info=dataset_info)
    console.print(hint, soft_wrap=True, highlight=False)
