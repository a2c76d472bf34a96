"""`ovis-data report`: argument parsing only; the work is in ovis_data.report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..clikit import ProgressDisplay
from ..report.build import make_report, select_datasets
from .app import app
from .common import InfoOption, QuietOption, RecipeOption, RootOption, console


@app.command("report")
def report(
    out: Annotated[Path, typer.Option(metavar="FILE", help="The HTML file to write (e.g. report.html).")],
    names: Annotated[
        list[str] | None, typer.Argument(help="Datasets to report on (default: all, or --stage/--recipe's).")
    ] = None,
    root: RootOption = None,
    stage: Annotated[
        int | None, typer.Option("--stage", help="The datasets of stage N's recipe (pipelines/stageN.toml).")
    ] = None,
    recipe: RecipeOption = None,
    packed: Annotated[
        Path | None,
        typer.Option(metavar="OUT", help="pack's --out folder (or its stageN folder): add the packed stage."),
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Count tokens exactly with this tokenizer (default: approximate, from characters).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the gallery's choice of samples.")] = 0,
    samples: Annotated[
        int, typer.Option(min=0, metavar="K", help="Good and rejected samples shown per dataset.")
    ] = 4,
    catalog_dir: Annotated[
        Path | None, typer.Option(help="Where validate wrote the catalogs (default: ROOT/catalogs).")
    ] = None,
    dataset_info: InfoOption = None,
    quiet: QuietOption = False,
) -> None:
    """Write one self-contained HTML page about the data: per dataset its samples, good and rejected by
    reason, histograms (tokens, turns, images per sample, image sizes), and a seeded gallery of good
    samples (conversation with supervised text marked) and rejected ones (reason, detail); with --packed,
    the packed stage's fill, records and drops. Reads validate's catalogs; opens in any browser, offline.

    Examples (after `ovis-data demo`; your own datasets):
        ovis-data report --stage 3 --root demo_out/data --packed demo_out/packed --out report.html
        ovis-data report --recipe my_recipe.toml --dataset-info my_info.json --root data --out mine.html
    """
    selection = select_datasets(stage, names, recipe, dataset_info)
    with ProgressDisplay(quiet) as shown:

        def on_progress(what: str, done: int, total: int) -> None:
            shown.update("datasets" if what == "datasets" else "tokens", done, total, "", what)

        made = make_report(
            selection,
            root,
            out,
            packed=packed,
            tokenizer=tokenizer,
            seed=seed,
            samples=samples,
            catalog_dir=catalog_dir,
            progress=on_progress,
        )
    kib = out.stat().st_size / 1024
    missing = [d.name for d in made.datasets if d.missing]
    console.print(f"report of {len(made.datasets)} datasets written to {out} ({kib:,.0f} KiB)")
    if missing:
        console.print(f"not validated yet (no catalog): {', '.join(missing)}", soft_wrap=True)
