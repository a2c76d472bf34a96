"""`ovis-data fetch`: download URL datasets (coyo-10m, the ovis_cc12m pair) into their image store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..clikit import expect_file, expect_file_or_creatable, print_table
from ..errors import OvisDataError
from ..fetch import FetchOptions, ImageParams, NetParams, fetch_datasets, parse_part
from ..fetch.progress import summary_table
from ..get import ensure_url_lists
from ..registry import load_registry, resolve_root
from .app import app
from .common import InfoOption, RootOption, console, err_console

ENGINES = ("ovis", "img2dataset")


@app.command("fetch")
def fetch(
    names: Annotated[
        list[str] | None, typer.Argument(help="URL datasets to fetch (default: every one with a URL source).")
    ] = None,
    root: RootOption = None,
    layout: Annotated[
        str | None,
        typer.Option(
            help="files (image_dir/<image_path>) or shards (tars + index); default: as found, else files."
        ),
    ] = None,
    max_side: Annotated[
        int, typer.Option(help="Cap the longer side (never upscales); 0 keeps the original bytes.")
    ] = 512,
    quality: Annotated[int, typer.Option(help="JPEG quality of re-encoded images.")] = 95,
    processes: Annotated[
        int, typer.Option(help="Worker processes, each downloading and decoding (0: every core).")
    ] = 0,
    concurrency: Annotated[int, typer.Option(help="Downloads in flight, in total.")] = 256,
    per_host: Annotated[int, typer.Option(help="Connections per host, in total.")] = 16,
    retries: Annotated[
        int, typer.Option(help="Extra attempts for transient failures (timeouts, 5xx, 429).")
    ] = 2,
    timeout: Annotated[float, typer.Option(help="Seconds allowed for one request.")] = 60.0,
    read_timeout: Annotated[float, typer.Option(help="Seconds of silence that end a download.")] = 20.0,
    allow_private: Annotated[
        bool, typer.Option("--allow-private", help="Allow loopback/private addresses (local servers, tests).")
    ] = False,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Re-attempt rows that failed for transient reasons.")
    ] = False,
    part: Annotated[str, typer.Option(help="Run the i-th of n equal parts, as i/n (1-based).")] = "1/1",
    shard_size: Annotated[
        int | None, typer.Option(help="Rows per shard (default 10000; fixed by the first run).")
    ] = None,
    engine: Annotated[str, typer.Option(help="ovis (built in) or img2dataset (optional extra).")] = "ovis",
    report: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
    dataset_info: InfoOption = None,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help="Run on a Ray cluster, one task per shard: auto (the cluster this node belongs to), "
            "local (start one here) or host:port. Needs the ray extra.",
        ),
    ] = None,
) -> None:
    """Download the images of URL datasets, resumably: re-run the same command after any interruption.

    Images land where the meta file expects them (ROOT/images/<image_dir>). Each URL list is read in
    shards of rows; a finished shard is never fetched again. Exit status 0 when the run completes (failed
    URLs are counted in the report, not errors), 2 for usage errors.

    Example:
        ovis-data fetch coyo-10m --root /data/ovis --layout shards --report coyo.json
    """
    expect_file(dataset_info, "--dataset-info")
    expect_file_or_creatable(report, "--report")
    if engine not in ENGINES:
        raise OvisDataError(f"--engine must be one of {list(ENGINES)}, got {engine!r}")
    if layout is not None and layout not in ("files", "shards"):
        raise OvisDataError(f"--layout must be files or shards, got {layout!r}")
    if max_side < 0 or not 1 <= quality <= 100 or concurrency < 1 or per_host < 1 or retries < 0:
        raise OvisDataError(
            "--max-side >= 0, 1 <= --quality <= 100, --concurrency/--per-host >= 1, --retries >= 0"
        )
    registry = load_registry(dataset_info)
    base = resolve_root(root, must_exist=False)
    options = FetchOptions(
        layout=layout,
        image=ImageParams(max_side=max_side, quality=quality),
        net=NetParams(
            concurrency=concurrency,
            per_host=per_host,
            retries=retries,
            total_timeout=timeout,
            read_timeout=read_timeout,
            allow_private=allow_private,
        ),
        processes=processes,
        shard_size=shard_size,
        retry_failed=retry_failed,
        part=parse_part(part),
        ray=ray,
    )
    if isinstance(base, Path):  # a URL list not there yet comes from its registry source first
        from ..fetch.api import url_datasets, url_spec

        wanted = [url_spec(registry, n) for n in names] if names else url_datasets(registry)
        for name in ensure_url_lists(wanted, base):
            err_console.print(f"got the URL list of {name} from its source")
    elif not base.is_dir():
        raise OvisDataError(f"data root {base} does not exist or holds nothing")
    if engine == "img2dataset":
        from ..fetch.img2dataset_engine import fetch_datasets_with_img2dataset

        reports = fetch_datasets_with_img2dataset(names, base, options, registry, err_console)
    else:
        reports = fetch_datasets(names, base, options, registry, err_console)
    for r in reports:
        print_table(console, summary_table(r))
    if report is not None:
        payload = reports[0].to_json() if len(reports) == 1 else [r.to_json() for r in reports]
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        console.print(f"report: {report}")
