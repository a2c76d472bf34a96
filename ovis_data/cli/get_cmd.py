"""`ovis-data get`: every dataset from its source to a root, verified and resumable."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..clikit import ProgressDisplay, fail
from ..fetch import FetchOptions, NetParams
from ..get import GetOptions, Hub, NotEnoughSpace, get, make_plan
from ..get.report import plan_json, plan_table, summary_table, write_report
from ..recipes import select_specs
from ..registry import resolve_root
from .app import app
from .common import InfoOption, QuietOption, RecipeOption, RootOption, console, err_console


@app.command("get")
def get_cmd(
    names: Annotated[list[str] | None, typer.Argument(help="Datasets to get (default: all).")] = None,
    root: RootOption = None,
    stage: Annotated[int | None, typer.Option(help="The datasets of this stage (1, 2 or 3).")] = None,
    recipe: RecipeOption = None,
    dataset_info: InfoOption = None,
    meta_only: Annotated[
        bool, typer.Option("--meta-only", help="Only the meta files (and URL lists); no images.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Show the plan (files, sizes, disk needed, what is there) and get nothing."
        ),
    ] = False,
    keep_archives: Annotated[
        bool,
        typer.Option("--keep-archives", help="Keep downloaded archives in ROOT/downloads/ after extraction."),
    ] = False,
    jobs: Annotated[int, typer.Option(help="Sources in flight at once (downloads overlap extractions).")] = 4,
    report: Annotated[Path | None, typer.Option(metavar="FILE", help="Write a JSON report here.")] = None,
    no_fetch: Annotated[
        bool, typer.Option("--no-fetch", help="URL datasets: get their URL lists only, not their images.")
    ] = False,
    allow_private: Annotated[
        bool,
        typer.Option("--allow-private", help="URL datasets: allow image URLs on loopback/private addresses."),
    ] = False,
    quiet: QuietOption = False,
) -> None:
    """Get datasets from their sources into ROOT: meta files to ROOT/meta_files/, images extracted to
    ROOT/images/<image_dir>/, where the meta files expect them.

    Sources are the `source` entries of the registry (yours too, with --dataset-info). Hub files come
    through huggingface_hub (HF_ENDPOINT, HF_TOKEN or `hf auth login`), plain URLs resume with Range
    requests; sizes and sha256 are verified when recorded. Re-run the same command after any
    interruption: finished sources are skipped. A source needing a manual step (a form) prints the step
    and the path its file must be put at. URL datasets then get their images through `ovis-data fetch`.
    Exit status: 0 when everything is in place, 1 when a source failed or waits for a manual step (the
    others are kept), 2 for usage errors.

    Examples:
        ovis-data get --stage 3 --root /data/ovis --dry-run
        ovis-data get --stage 3 --root /data/ovis --report get.json
        ovis-data get llava-pretrain-558k sharegpt4v-pretrain-82k --root /data/ovis --jobs 8
        ovis-data get --meta-only --root /data/ovis

    Your own datasets (entries with a `source`, see docs/get.md):
        ovis-data get --dataset-info my_info.json --root /data/mine
    """
    if jobs < 1:
        raise typer.BadParameter("--jobs must be at least 1")
    specs, registry = select_specs(names, stage, recipe, dataset_info, "gets")
    without = [s.name for s in specs if s.source is None]
    if names and without:
        raise typer.BadParameter(f"no source recorded for {', '.join(without)} (add a 'source' to its entry)")
    if without:
        err_console.print(
            f"no source recorded (left out): {', '.join(without)}", highlight=False, soft_wrap=True
        )
    base = resolve_root(root, must_exist=False)
    if not isinstance(base, Path):
        raise typer.BadParameter("get writes to a local folder: --root must not be an object-store URL")
    opts = GetOptions(meta_only=meta_only, keep_archives=keep_archives, jobs=jobs, hub=Hub())
    if dry_run:
        plan = make_plan(specs, base, opts.hub, meta_only, probe=True)
        console.print(plan_table(plan))
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps(plan_json(plan), indent=2) + "\n", encoding="utf-8")
        return
    fetch_options = None if no_fetch else FetchOptions(net=NetParams(allow_private=allow_private))
    try:
        with ProgressDisplay(quiet) as shown:

            def on_progress(name: str, done: int, total: int) -> None:
                shown.update(name, done, total or None, "B" if name == "downloading" else "files")

            outcome = get(
                specs,
                base,
                opts,
                on_progress if shown.enabled else None,
                fetch_options,
                registry,
                err_console,
            )
    except NotEnoughSpace as e:
        fail(str(e), 1)
    for r in outcome.results:
        if r.status in ("failed", "manual"):
            err_console.print(f"[bold red]{r.status}:[/] {r.detail}", highlight=False, soft_wrap=True)
    console.print(summary_table(outcome.results, outcome.gaps))
    if no_fetch and any(s.url_source for s in specs):
        urls = " ".join(s.name for s in specs if s.url_source)
        console.print(f"images of URL datasets: ovis-data fetch {urls} --root {base}", soft_wrap=True)
    if report is not None:
        write_report(report, base, outcome.results, outcome.gaps, outcome.exit_code)
        console.print(f"report: {report}")
    sys.stdout.flush()
    raise typer.Exit(outcome.exit_code)
