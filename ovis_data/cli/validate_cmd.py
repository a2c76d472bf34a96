"""`ovis-data validate`: check meta files against image folders and report every bad sample."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..clikit import (
    ProgressDisplay,
    expect_dir_or_creatable,
    expect_file,
    expect_file_or_creatable,
    print_table,
)
from ..recipes import select_specs
from ..registry import resolve_root
from ..report.hint import report_hint
from ..validate.bad_samples_report import summary_table, write_report
from ..validate.dataset import validate_dataset
from ..validate.imagecheck import DEFAULT_MAX_PIXELS, ImageLimits
from .app import app
from .common import InfoOption, QuietOption, RecipeOption, RootOption, console


@app.command("validate")
def validate(
    names: Annotated[list[str] | None, typer.Argument(help="Datasets to check (default: all).")] = None,
    root: RootOption = None,
    stage: Annotated[int | None, typer.Option(help="Only the datasets of this stage (1, 2 or 3).")] = None,
    recipe: RecipeOption = None,
    report: Annotated[
        Path | None, typer.Option(help="Write a JSON report of counts and bad samples.")
    ] = None,
    deep: Annotated[
        bool, typer.Option("--deep", help="Fully decode every image (slower, thorough).")
    ] = False,
    meta_only: Annotated[
        bool, typer.Option("--meta-only", help="Check meta files and file existence only; open no image.")
    ] = False,
    processes: Annotated[
        int | None,
        typer.Option(
            help="Worker processes for image checks (default: all cores; this process alone for a small set)."
        ),
    ] = None,
    catalog_dir: Annotated[
        Path | None, typer.Option(help="Where catalogs go (default: ROOT/catalogs).")
    ] = None,
    min_side: Annotated[int, typer.Option(help="Reject images whose shorter side is below this.")] = 1,
    max_aspect: Annotated[
        float | None, typer.Option(help="Reject images more elongated than this ratio.")
    ] = None,
    max_pixels: Annotated[
        int, typer.Option(help="Larger images are decompression bombs.")
    ] = DEFAULT_MAX_PIXELS,
    dataset_info: InfoOption = None,
    quiet: QuietOption = False,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help="Check images as Ray tasks: auto (this node's cluster), local or host:port; the root on "
            "storage every node sees (or s3://). Needs the ray extra.",
        ),
    ] = None,
) -> None:
    """Check meta files against their images; write the catalogs of good samples that pack reads.

    Default mode reads every image's header (size, format, end marker); --deep decodes fully in parallel;
    --meta-only checks the meta files and that each image exists. Exit status: 0 when every sample is
    good, 1 when some are bad (catalogs still written), 2 for usage or configuration errors.

    Examples:
        ovis-data validate llava-finetune-665k --root /data/ovis --report bad.json
        ovis-data validate --stage 3 --deep

    Your own datasets:
        ovis-data validate --recipe my_recipe.toml --dataset-info my_info.json --root /data/mine
    """
    expect_file(dataset_info, "--dataset-info")
    expect_file(recipe, "--recipe")
    expect_file_or_creatable(report, "--report")
    expect_dir_or_creatable(catalog_dir, "--catalog-dir")
    if deep and meta_only:
        raise typer.BadParameter("--deep and --meta-only exclude each other")
    specs, registry = select_specs(names, stage, recipe, dataset_info, "validates")
    base = resolve_root(root)
    mode = "meta" if meta_only else ("deep" if deep else "header")
    limits = ImageLimits(max_pixels=max_pixels, min_side=min_side, max_aspect=max_aspect)
    results = []
    with ProgressDisplay(quiet) as shown:
        on_images = shown.callback("images of", "img") if mode != "meta" else None
        for i, spec in enumerate(specs):
            shown.update("datasets", i, len(specs), "", f"validating {spec.name}")
            shown.reset("images of")
            results.append(
                validate_dataset(
                    spec, base, mode, limits, processes, catalog_dir, progress=on_images, ray=ray
                )
            )
    print_table(console, summary_table(results))
    if report:
        write_report(report, results, base, catalog_dir)
        console.print(f"report written to {report}")
    hint = report_hint(
        base, stage=stage, names=names, recipe=recipe, dataset_info=dataset_info, catalog_dir=catalog_dir
    )
    console.print(hint, soft_wrap=True, highlight=False)
    bad = sum(r.bad for r in results) + sum(1 for r in results if r.error)
    raise typer.Exit(1 if bad else 0)
