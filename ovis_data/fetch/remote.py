"""Fetch into object storage: today's engine runs on a local staging folder and each finished shard is put
into the store, its done-marker last, then dropped locally (a node needs room for the shards in flight,
not for the dataset).

The store is the truth: a run starts by copying its bookkeeping (run.json, every finished shard's status
and done-marker) into a fresh staging folder, so the engine plans, resumes and reports exactly as it does
on a local disk, whichever machine ran the earlier shards. Each object is one PUT (whole or absent);
readers never look at a shard before its done-marker, which is put after the shard's tar, status and index.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
from rich.console import Console

from ..imagestore import build_index
from ..storage import AnyPath, RemotePath, staging_dir
from . import classes as C
from .engine import fetch_local
from .options import RUN_FILE, FetchOptions
from .progress import FetchReport
from .reader import UrlList, part_shards, shard_count
from .writer import BOOKKEEPING, shard_name, status_dir

INDEX_PARTS = f"{BOOKKEEPING}/index"


def _rel(remote: RemotePath, path: RemotePath) -> str:
    return path.url[len(remote.url) + 1 :]


def pull_bookkeeping(
    remote: RemotePath, staging: Path, retry_failed: bool, part: tuple[int, int] = (0, 1)
) -> str | None:
    """Copy the store's run.json and the finished status of the part's shards into `staging` (emptied
    first); with retry_failed, also the tars that will be added to. Returns the layout recorded, if any."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    run = remote / RUN_FILE
    if not run.exists():
        return None
    run.get_file(staging / RUN_FILE)
    run_info = json.loads((staging / RUN_FILE).read_text())
    layout = run_info["layout"]
    n_shards = shard_count(run_info["total_rows"], run_info["shard_size"])
    mine = {shard_name(s) for s in part_shards(n_shards, part)}
    where = remote if layout == "shards" else remote / BOOKKEEPING
    local = status_dir(staging, layout)
    shards = [m.name[: -len("_stats.json")] for m in where.glob("*_stats.json")]
    shards = [s for s in shards if s in mine]
    names = [f"{s}{ext}" for s in shards for ext in (".parquet", "_stats.json")]
    local.mkdir(parents=True, exist_ok=True)
    if names:  # small files, many of them: one batched, concurrent get
        remote.fs.get([f"{where.path}/{x}" for x in names], [str(local / x) for x in names])
    for shard in shards if retry_failed and layout == "shards" else []:
        failed = pq.read_table(local / f"{shard}.parquet", columns=["error_class"]).column("error_class")
        if any(c in C.RETRY_LATER for c in failed.to_pylist()):  # retry-failed adds to this tar
            (remote / f"{shard}.tar").get_file(staging / f"{shard}.tar")
    return layout


def push_shard(remote: RemotePath, staging: Path, layout: str, shard_id: int) -> None:
    """Put one finished shard into the store, done-marker last; drop its images locally."""
    name = shard_name(shard_id)
    (remote / RUN_FILE).put_file(staging / RUN_FILE)  # before any done-marker that depends on it
    local = status_dir(staging, layout)
    if layout == "shards":
        tar = staging / f"{name}.tar"
        (remote / f"{name}.tar").put_file(tar)
        (remote / INDEX_PARTS / f"{name}.parquet").put_file(staging / INDEX_PARTS / f"{name}.parquet")
        tar.unlink()
    else:
        paths = pq.read_table(local / f"{name}.parquet", columns=["image_path", "status"]).to_pylist()
        images = [r["image_path"] for r in paths if r["status"] == "success"]
        if images:  # many small objects: one batched, concurrent put
            remote.fs.put([str(staging / p) for p in images], [f"{remote.path}/{p}" for p in images])
            for p in images:
                (staging / p).unlink(missing_ok=True)
    where = remote if layout == "shards" else remote / BOOKKEEPING
    (where / f"{name}.parquet").put_file(local / f"{name}.parquet")
    (where / f"{name}_stats.json").put_file(local / f"{name}_stats.json")


def fetch_here(
    url_list: UrlList,
    image_dir: AnyPath,
    options: FetchOptions,
    label: str = "",
    console: Console | None = None,
    index: bool = True,
) -> FetchReport:
    """The engine on this machine: into a local folder directly, into an object store through a staging
    folder (see the module's docstring)."""
    if not isinstance(image_dir, RemotePath):
        return fetch_local(url_list, image_dir, options, label, console, index=index)
    remote = image_dir
    i, n = options.part
    staging = staging_dir("fetch", f"{remote}#part-{i + 1}-of-{n}")
    pull_bookkeeping(remote, staging, options.retry_failed, options.part)
    layouts: list[str] = []

    def on_shard(shard_id: int) -> None:
        if not layouts:
            layouts.append(json.loads((staging / RUN_FILE).read_text())["layout"])
        push_shard(remote, staging, layouts[0], shard_id)

    report = fetch_local(url_list, staging, options, label, console, on_shard=on_shard, index=False)
    (remote / RUN_FILE).put_file(staging / RUN_FILE)
    if report.layout == "shards" and index:
        build_index(remote)  # from the shards' index parts in the store
    return replace(report, image_dir=str(remote))
