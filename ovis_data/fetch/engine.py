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
from pathlib import Path

import pyarrow.parquet as pq
from rich.console import Console

from ..errors import OvisDataError
from ..imagestore import INDEX_NAME, build_index
from . import classes as C
from .fetchers import Fetchers
from .options import FetchOptions, settle_run
from .progress import FetchReport, Monitor
from .reader import UrlList, part_shards, shard_count
from .runner import Runner, ShardPlan
from .writer import BOOKKEEPING, AtomicFiles, done_marker, shard_name, status_dir


def fetch_local(
    url_list: UrlList,
    image_dir: Path,
    opts: FetchOptions,
    label: str = "",
    console: Console | None = None,
    on_shard: Callable[[int], None] | None = None,
    index: bool = True,
) -> FetchReport:
    """The engine proper: any parquet URL list into a local image directory, on this machine.
    `on_shard(shard_id)` runs (in a thread) after a shard's done-marker is written; `index=False` leaves
    the shards layout's index.parquet to the caller (several runs sharing an image_dir must not all
    rewrite it)."""
    image_dir.mkdir(parents=True, exist_ok=True)
    book = image_dir / BOOKKEEPING
    book.mkdir(exist_ok=True)
    i, n = opts.part
    with _lock(book / f"lock-{i + 1}-of-{n}"):
        layout, shard_size = settle_run(image_dir, url_list, opts)
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
@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One fetch per image_dir and part at a time (the lock dies with its process, even on SIGKILL)."""
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise OvisDataError(f"another fetch is writing {path.parent.parent} (lock {path.name})") from e
        yield


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
