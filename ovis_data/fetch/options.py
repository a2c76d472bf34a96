"""A fetch run's options, and the settings the first run of an image_dir fixes for every later one (its
layout and shard size, in `.fetch/run.json`), which every engine (local, object store, Ray) settles alike."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OvisDataError
from ..imagestore import is_shard_dir
from .fetchers import PROCESSOR
from .images import ImageParams
from .net import NetParams
from .reader import UrlList
from .writer import BOOKKEEPING, AtomicFiles

LAYOUTS = ("files", "shards")
DEFAULT_SHARD_SIZE = 10_000
RUN_FILE = f"{BOOKKEEPING}/run.json"  # under image_dir


@dataclass(frozen=True)
class FetchOptions:
    layout: str | None = None  # None: what image_dir already holds, else "files"
    image: ImageParams = field(default_factory=ImageParams)
    net: NetParams = field(default_factory=NetParams)
    processes: int = 0  # 0: every core
    shard_size: int | None = None  # None: what an earlier run of this image_dir used, else 10,000
    shards_in_flight: int = 2  # a second shard keeps the network busy while the first one's tail drains
    retry_failed: bool = False
    part: tuple[int, int] = (0, 1)  # (i, n): the i-th (0-based) of n equal parts
    row_deadline_s: float | None = None  # network part of a row; None: derived from the net deadlines
    process_deadline_s: float = 120.0  # decode + resize + encode of one image; past it, its worker is killed
    stall_s: float = 300.0  # a run where no row finishes for this long has its stuck rows ended
    durable: bool = True  # fsync a shard's files before its done-marker (survives power loss)
    processor: str = PROCESSOR  # "module:function" with process_image's signature, run in the workers
    ray: str | None = None  # a Ray cluster's address ("auto", "local", host:port): one task per shard


def parse_part(text: str) -> tuple[int, int]:
    """'i/n' with 1 <= i <= n (as typed by a user) -> (i-1, n)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError as e:
        raise OvisDataError(f"--part must look like i/n (e.g. 3/8), got {text!r}") from e
    if not 1 <= i <= n:
        raise OvisDataError(f"--part {text}: need 1 <= i <= n")
    return i - 1, n


def settle_run(image_dir: Path, url_list: UrlList, opts: FetchOptions) -> tuple[str, int]:
    """Layout and shard size: fixed by the first run of an image_dir, so resume and retry line up."""
    if opts.layout is not None and opts.layout not in LAYOUTS:
        raise OvisDataError(f"layout must be one of {list(LAYOUTS)}, got {opts.layout!r}")
    if opts.shard_size is not None and opts.shard_size < 1:
        raise OvisDataError("shard size must be at least 1")
    run_file = image_dir / RUN_FILE
    if run_file.exists():
        run = json.loads(run_file.read_text())
        if opts.layout is not None and opts.layout != run["layout"]:
            raise OvisDataError(
                f"{image_dir} holds the {run['layout']} layout; fetch again with --layout {run['layout']} "
                f"or into an empty directory"
            )
        if opts.shard_size is not None and opts.shard_size != run["shard_size"]:
            raise OvisDataError(f"{image_dir} was fetched with shard size {run['shard_size']}; keep it")
        if run["total_rows"] != url_list.total_rows:
            raise OvisDataError(
                f"{url_list.path} has {url_list.total_rows} rows but {image_dir} was fetched from "
                f"{run['total_rows']}: shards would not line up; fetch into an empty directory"
            )
        return run["layout"], run["shard_size"]
    layout = opts.layout or ("shards" if is_shard_dir(image_dir) else "files")
    if layout == "files" and is_shard_dir(image_dir):
        raise OvisDataError(f"{image_dir} holds tar shards; use --layout shards")
    run = {
        "layout": layout,
        "shard_size": opts.shard_size or DEFAULT_SHARD_SIZE,
        "total_rows": url_list.total_rows,
        "url_list": str(url_list.path),
    }
    AtomicFiles(image_dir / BOOKKEEPING).write_json(run_file, run)
    return layout, run["shard_size"]
