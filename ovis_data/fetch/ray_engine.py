"""`fetch --ray ADDRESS`: the URL list's shards as Ray tasks, each running today's engine on its node.

A shard of rows stays the unit of work, resume and report: the driver settles the run (layout, shard
size: run.json), then submits one task per shard of its part; each task is `fetch_url_list` on that one
shard (`part = (shard, n_shards)`), on as many cores as it reserved, into the same image_dir (storage
every node sees, or an object store). Ray retries a task whose node died; the engine redoes that shard
from scratch (its lock died with the process, its temporaries are cleaned). A re-run after the driver
itself was killed finds the done-markers, as a local run does. The driver merges the tasks' reports and
builds the shards layout's index once. Ray is an optional extra, imported only here.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from ..errors import OvisDataError
from ..imagestore import build_index
from ..storage import AnyPath, RemotePath, staging_dir
from .options import RUN_FILE, FetchOptions, settle_run
from .progress import FetchReport
from .reader import UrlList, part_shards, shard_count
from .remote import fetch_here, pull_bookkeeping

TASK_RETRIES = 4  # a task lost with its node (or its worker) is run again up to this many times


def connect(address: str) -> Any:
    """ray, initialised: 'auto' joins this node's cluster, 'local' starts one here, else an address."""
    try:
        import ray
    except ImportError as e:
        raise OvisDataError("--ray needs Ray: pip install 'ovis-toolkit[ray]'") from e
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, log_to_driver=False)
    return ray


def task_cpus(ray: Any, processes: int) -> int:
    """CPUs per task: --processes when given, else the smallest alive node's (one task fills a node)."""
    if processes > 0:
        return processes
    cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    cpus = [int(c) for c in cpus if c >= 1]
    if not cpus:
        raise OvisDataError("the Ray cluster has no node with a CPU to run fetch tasks on")
    return min(cpus)


def _fetch_one(url_list: UrlList, image_dir: AnyPath, options: FetchOptions) -> FetchReport:
    return fetch_here(url_list, image_dir, options, label=f"shard {options.part[0]}", index=False)


def _settle(url_list: UrlList, image_dir: AnyPath, opts: FetchOptions) -> tuple[str, int]:
    """Layout and shard size as a local run settles them (run.json written before any task starts)."""
    if isinstance(image_dir, RemotePath):
        staging = staging_dir("fetch", f"{image_dir}#driver")
        pull_bookkeeping(image_dir, staging, retry_failed=False)
        (staging / RUN_FILE).parent.mkdir(parents=True, exist_ok=True)
        layout, size = settle_run(staging, url_list, opts)
        (image_dir / RUN_FILE).put_file(staging / RUN_FILE)
        return layout, size
    (Path(image_dir) / RUN_FILE).parent.mkdir(parents=True, exist_ok=True)
    return settle_run(Path(image_dir), url_list, opts)


def fetch_with_ray(
    url_list: UrlList, image_dir: AnyPath, opts: FetchOptions, label: str = "", console: Console | None = None
) -> FetchReport:
    assert opts.ray is not None
    ray = connect(opts.ray)
    started = time.monotonic()
    layout, shard_size = _settle(url_list, image_dir, opts)
    cpus = task_cpus(ray, opts.processes)
    n_shards = shard_count(url_list.total_rows, shard_size)
    shard_ids = part_shards(n_shards, opts.part)
    task_opts = replace(opts, ray=None, layout=layout, shard_size=shard_size, processes=cpus)
    remote_fn = ray.remote(_fetch_one).options(num_cpus=cpus, max_retries=TASK_RETRIES)
    url_ref = ray.put(url_list)
    shard_opts = [replace(task_opts, part=(s, n_shards)) for s in shard_ids]
    pending = [remote_fn.remote(url_ref, image_dir, o) for o in shard_opts]
    reports: list[FetchReport] = []
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        reports.extend(ray.get(done))
        if console is not None and console.is_terminal:
            console.print(f"fetch {label}: {len(reports)}/{len(shard_ids)} shards", end="\r")
    if layout == "shards":
        build_index(image_dir)
    return merge_reports(label, reports, str(image_dir), layout, time.monotonic() - started)


def merge_reports(label: str, reports: list[FetchReport], image_dir: str, layout: str, elapsed: float):
    """One report for the part: counts summed over the shards' reports, rates over the driver's time."""
    failed: Counter[str] = Counter()
    shards: Counter[str] = Counter()
    this_run: Counter[str] = Counter()
    for r in reports:
        failed.update(r.failed)
        shards.update(r.shards)
        this_run.update(r.this_run)
    ok_now = this_run["success"]
    return FetchReport(
        dataset=label,
        total=sum(r.total for r in reports),
        success=sum(r.success for r in reports),
        failed=dict(failed.most_common()),
        elapsed_s=round(elapsed, 3),
        images_per_s=round(ok_now / elapsed, 2) if elapsed > 0 else 0.0,
        image_dir=image_dir,
        layout=layout,
        shards={k: shards[k] for k in ("total", "done_before", "done_now", "unfinished")},
        this_run={k: this_run[k] for k in ("attempted", "success", "failed")},
    )
