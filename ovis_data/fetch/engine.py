"""Fetch a URL list into an image store: shards of rows, downloaded concurrently, processed on every core.

A shard of rows is the unit of work, of resume and of reporting. Per run:
  plan     which shards of this part are unfinished (or, with retry_failed, which rows failed transiently)
  run      asyncio: a bounded number of rows in flight across at most `shards_in_flight` shards; each row
           is downloaded and processed by one of the worker processes (fetchers.py), then written
           atomically by this process (runner.py)
  finish   a shard's status parquet, then its _stats.json done-marker; the shards layout then gets its index
A watchdog ends rows that overrun their deadline and shards where nothing finishes for `stall_s`.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from rich.console import Console

from ..errors import OvisDataError
from ..imagestore import INDEX_NAME, build_index, is_shard_dir
from ..registry import DatasetSpec, load_registry
from ..storage import AnyPath, RemotePath
from . import classes as C
from .fetchers import PROCESSOR, Fetchers
from .images import ImageParams
from .net import NetParams
from .progress import FetchReport, Monitor
from .reader import UrlList, open_url_list, part_shards, shard_count
from .runner import Runner, ShardPlan
from .writer import BOOKKEEPING, AtomicFiles, done_marker, shard_name, status_dir

LAYOUTS = ("files", "shards")
DEFAULT_SHARD_SIZE = 10_000
RUN_FILE = "run.json"


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


# -- public entry points ------------------------------------------------------------------------------
def url_datasets(registry: dict[str, DatasetSpec]) -> list[DatasetSpec]:
    return [s for s in registry.values() if s.url_source is not None]


def fetch_datasets(
    names: list[str] | None,
    root: Path,
    options: FetchOptions | None = None,
    registry: dict[str, DatasetSpec] | None = None,
    console: Console | None = None,
) -> list[FetchReport]:
    """Fetch the named URL datasets (all of them when none named). Datasets sharing an image_dir and a
    URL list (the cc12m pair) are fetched once."""
    registry = registry if registry is not None else load_registry()
    specs = url_datasets(registry) if not names else [url_spec(registry, n) for n in names]
    groups: dict[tuple[str, str], list[DatasetSpec]] = {}
    for spec in specs:
        assert spec.url_source is not None and spec.image_dir is not None
        groups.setdefault((spec.image_dir, spec.url_source.url_list), []).append(spec)
    reports = []
    for group in groups.values():
        label = "+".join(s.name for s in group)
        reports.append(fetch_dataset(group[0].name, root, options, registry, console, label=label))
    return reports


def fetch_dataset(
    name: str,
    root: Path,
    options: FetchOptions | None = None,
    registry: dict[str, DatasetSpec] | None = None,
    console: Console | None = None,
    label: str | None = None,
) -> FetchReport:
    """Fetch one URL dataset's images into ROOT/images/<image_dir>, where its meta file expects them."""
    registry = registry if registry is not None else load_registry()
    spec = url_spec(registry, name)
    us = spec.url_source
    assert us is not None
    url_list = open_url_list(spec.url_list_path(root), us.url_column, us.image_path_column, us.sha256_column)
    image_dir = spec.image_path(root)
    assert image_dir is not None
    return fetch_url_list(url_list, image_dir, options, label=label or name, console=console)


def fetch_url_list(
    url_list: UrlList,
    image_dir: AnyPath,
    options: FetchOptions | None = None,
    label: str = "",
    console: Console | None = None,
    on_shard: Callable[[int], None] | None = None,
    index: bool = True,
) -> FetchReport:
    """The engine proper: any parquet URL list into any image directory (an object-store URL goes through
    fetch.remote: fetched here, each finished shard put there). `on_shard(shard_id)` runs (in a thread)
    after a shard's done-marker is written; `index=False` leaves the shards layout's index.parquet to the
    caller (several runs sharing an image_dir must not all rewrite it)."""
    if options is not None and options.ray is not None:
        from .ray_engine import fetch_with_ray

        return fetch_with_ray(url_list, image_dir, options, label, console)
    if isinstance(image_dir, RemotePath):
        from .remote import fetch_to_remote

        return fetch_to_remote(url_list, image_dir, options or FetchOptions(), label, console, index=index)
    opts = options or FetchOptions()
    image_dir.mkdir(parents=True, exist_ok=True)
    book = image_dir / BOOKKEEPING
    book.mkdir(exist_ok=True)
    i, n = opts.part
    with _lock(book / f"lock-{i + 1}-of-{n}"):
        layout, shard_size = _settle_run(image_dir, url_list, opts)
        atomic = AtomicFiles(book / "tmp" / f"part-{i + 1}-of-{n}")
        atomic.clean()  # whatever a killed run left half-written
        shard_ids = part_shards(shard_count(url_list.total_rows, shard_size), opts.part)
        plan, done_before = _plan(image_dir, layout, url_list, shard_size, shard_ids, opts.retry_failed)
        if layout == "shards" and plan:
            (image_dir / INDEX_NAME).unlink(missing_ok=True)  # rebuilt below; a stale one would mislead
        attempted = sum(len(p.rows) if p.rows is not None else p.stop - p.start for p in plan)
        monitor = Monitor(label or url_list.path.name, attempted, console)
        fetchers = Fetchers(opts.processes, opts.net, opts.image, opts.process_deadline_s, opts.processor)
        try:
            with monitor:
                runner = Runner(url_list, image_dir, layout, shard_size, opts, monitor, atomic, fetchers)
                runner.on_shard = on_shard
                asyncio.run(runner.run(plan))
        finally:
            fetchers.close()
        if layout == "shards" and index:
            build_index(image_dir)
        return _report(label, url_list, image_dir, layout, shard_size, shard_ids, done_before, plan, monitor)


# -- planning -----------------------------------------------------------------------------------------
def url_spec(registry: dict[str, DatasetSpec], name: str) -> DatasetSpec:
    if name not in registry:
        raise OvisDataError(f"unknown dataset {name!r}; known: {', '.join(registry)}")
    spec = registry[name]
    if spec.url_source is None:
        with_urls = ", ".join(s.name for s in url_datasets(registry))
        raise OvisDataError(f"{name} has no URL source to fetch (datasets with one: {with_urls})")
    return spec


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One fetch per image_dir and part at a time (the lock dies with its process, even on SIGKILL)."""
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise OvisDataError(f"another fetch is writing {path.parent.parent} (lock {path.name})") from e
        yield


def _settle_run(image_dir: Path, url_list: UrlList, opts: FetchOptions) -> tuple[str, int]:
    """Layout and shard size: fixed by the first run of an image_dir, so resume and retry line up."""
    if opts.layout is not None and opts.layout not in LAYOUTS:
        raise OvisDataError(f"layout must be one of {list(LAYOUTS)}, got {opts.layout!r}")
    if opts.shard_size is not None and opts.shard_size < 1:
        raise OvisDataError("shard size must be at least 1")
    run_file = image_dir / BOOKKEEPING / RUN_FILE
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


def _plan(
    image_dir: Path, layout: str, url_list: UrlList, shard_size: int, shard_ids: range, retry_failed: bool
) -> tuple[list[ShardPlan], int]:
    plan: list[ShardPlan] = []
    done_before = 0
    for sid in shard_ids:
        start, stop = sid * shard_size, min(url_list.total_rows, (sid + 1) * shard_size)
        if not done_marker(image_dir, layout, sid).exists():
            plan.append(ShardPlan(sid, start, stop))
            continue
        if retry_failed:
            status = status_dir(image_dir, layout) / f"{shard_name(sid)}.parquet"
            previous = pq.read_table(status).to_pylist()
            again = [r["row"] - start for r in previous if r["error_class"] in C.RETRY_LATER]
            if again:
                plan.append(ShardPlan(sid, start, stop, again, previous))
                continue
        done_before += 1
    return plan, done_before


def _report(
    label: str,
    url_list: UrlList,
    image_dir: Path,
    layout: str,
    shard_size: int,
    shard_ids: range,
    done_before: int,
    plan: list[ShardPlan],
    monitor: Monitor,
) -> FetchReport:
    """Totals over every finished shard of this part (earlier runs included); rates for this run."""
    success = 0
    failed: Counter[str] = Counter()
    finished = 0
    for sid in shard_ids:
        marker = done_marker(image_dir, layout, sid)
        if marker.exists():
            stats = json.loads(marker.read_text())
            finished += 1
            success += stats["successes"]
            failed.update(stats["failed"])
    total = sum(min(url_list.total_rows, (s + 1) * shard_size) - s * shard_size for s in shard_ids)
    elapsed = monitor.elapsed
    ok_now = monitor.counts[C.SUCCESS]
    return FetchReport(
        dataset=label,
        total=total,
        success=success,
        failed=dict(failed.most_common()),
        elapsed_s=round(elapsed, 3),
        images_per_s=round(ok_now / elapsed, 2) if elapsed > 0 else 0.0,
        image_dir=str(image_dir),
        layout=layout,
        shards={
            "total": len(shard_ids),
            "done_before": done_before,
            "done_now": finished - done_before,
            "unfinished": len(shard_ids) - finished,
        },
        this_run={"attempted": monitor.done, "success": ok_now, "failed": monitor.done - ok_now},
    )
