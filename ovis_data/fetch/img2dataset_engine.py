"""`--engine img2dataset`: run img2dataset (an optional, separately installed tool) on the same URL list and
bring its output into the same image store.

img2dataset pins old webdataset and pulls wandb/opencv, so it is never imported here: it runs as a
program found through $OVIS_IMG2DATASET or PATH (e.g. from its own venv). Its webdataset output is the
shards layout already (image_path rides along as an additional column); for the files layout its tars
are unpacked into image_dir/<image_path> atomically. Either way each shard's status parquet gains an
`error_class` column with our stable failure classes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.console import Console

from ..errors import OvisDataError
from ..imagestore import build_index, unsafe_path_reason
from ..registry import DatasetSpec, load_registry
from . import classes as C
from .api import url_spec
from .frames import default_processes
from .options import DEFAULT_SHARD_SIZE, FetchOptions
from .progress import FetchReport
from .reader import UrlList, open_url_list
from .writer import BOOKKEEPING, AtomicFiles

ENV_BINARY = "OVIS_IMG2DATASET"

# img2dataset reports errors as free text (urllib / PIL / its own); map them to our classes.
_ERROR_PATTERNS = [
    (r"HTTP Error 404", C.HTTP_404),
    (r"HTTP Error 429", C.HTTP_429),
    (r"HTTP Error 5\d\d", C.HTTP_5XX),
    (r"HTTP Error 30\d.*infinite loop", C.REDIRECT_LOOP),
    (r"HTTP Error 30\d", C.TOO_MANY_REDIRECTS),
    (r"HTTP Error 4\d\d", C.HTTP_4XX),
    (r"X-Robots-Tag", C.OPTED_OUT),
    (r"timed out|timeout", C.TIMEOUT),
    (r"Connection refused", C.CONNECTION_REFUSED),
    (r"Connection reset|Remote end closed", C.CONNECTION_RESET),
    (r"Name or service not known|nodename nor servname|Temporary failure in name resolution", C.DNS_ERROR),
    (r"IncompleteRead", C.TRUNCATED),
    (r"[Dd]ecompression ?[Bb]omb", C.DECOMPRESSION_BOMB),
    (r"hash mismatch", C.HASH_MISMATCH),
    (r"unknown url type|unsupported", C.UNSUPPORTED_SCHEME),
    (r"SSL|CERTIFICATE", C.SSL_ERROR),
]


def error_class(message: str | None) -> str:
    for pattern, cls in _ERROR_PATTERNS:
        if message and re.search(pattern, message):
            return cls
    return C.DECODE_ERROR if message and "decode" in message.lower() else C.CONNECTION_ERROR


def find_binary() -> str:
    found = os.environ.get(ENV_BINARY) or shutil.which("img2dataset")
    if not found:
        raise OvisDataError(
            "img2dataset not found: install it in its own venv (it pins webdataset<0.3), e.g. "
            "`python -m venv ~/i2d && ~/i2d/bin/pip install img2dataset`, then set "
            f"{ENV_BINARY}=~/i2d/bin/img2dataset or put it on PATH"
        )
    return found


def img2dataset_command(
    binary: str, url_list: UrlList, out_dir: Path, opts: FetchOptions, shard_size: int
) -> list[str]:
    processes = opts.processes or default_processes()
    threads = max(1, math.ceil(opts.net.concurrency / processes))
    image = opts.image
    resize = (
        ["--resize_mode=no", "--skip_reencode=True"]
        if image.max_side <= 0
        else [
            f"--image_size={image.max_side}",
            "--resize_mode=keep_ratio_largest",
            "--resize_only_if_bigger=True",
        ]
    )
    return [
        binary,
        f"--url_list={url_list.path}",
        "--input_format=parquet",
        f"--url_col={url_list.url_column}",
        f"--save_additional_columns={json.dumps([url_list.image_path_column])}",
        f"--output_folder={out_dir}",
        "--output_format=webdataset",
        f"--processes_count={processes}",
        f"--thread_count={threads}",
        f"--encode_quality={image.quality}",
        "--encode_format=jpg",
        f"--number_sample_per_shard={shard_size}",
        f"--timeout={max(1, round(opts.net.total_timeout))}",
        f"--retries={opts.net.retries}",
        f"--max_image_area={image.max_pixels}",
        "--enable_wandb=False",
        "--incremental_mode=incremental",
        *resize,
    ]


def fetch_datasets_with_img2dataset(
    names: list[str] | None,
    root: Path,
    options: FetchOptions,
    registry: dict[str, DatasetSpec] | None = None,
    console: Console | None = None,
) -> list[FetchReport]:
    registry = registry if registry is not None else load_registry()
    specs = (
        [s for s in registry.values() if s.url_source]
        if not names
        else [url_spec(registry, n) for n in names]
    )
    seen: dict[tuple[str | None, str], list[str]] = {}
    for s in specs:
        assert s.url_source is not None
        seen.setdefault((s.image_dir, s.url_source.url_list), []).append(s.name)
    reports = []
    for group in seen.values():
        spec = registry[group[0]]
        us = spec.url_source
        assert us is not None and spec.image_dir is not None
        url_list = open_url_list(
            spec.url_list_path(root), us.url_column, us.image_path_column, us.sha256_column
        )
        image_dir = spec.image_path(root)
        assert image_dir is not None
        reports.append(fetch_with_img2dataset(url_list, image_dir, options, "+".join(group), console))
    return reports


def fetch_with_img2dataset(
    url_list: UrlList, image_dir: Path, options: FetchOptions, label: str = "", console: Console | None = None
) -> FetchReport:
    if options.part != (0, 1) or options.retry_failed:
        raise OvisDataError("--part and --retry-failed need the built-in engine (img2dataset has neither)")
    if not options.net.allow_private and console is not None:
        console.print("[yellow]note:[/] img2dataset does not refuse private or loopback addresses")
    layout = options.layout or "files"
    shard_size = options.shard_size or DEFAULT_SHARD_SIZE
    book = image_dir / BOOKKEEPING
    book.mkdir(parents=True, exist_ok=True)
    out_dir = image_dir if layout == "shards" else book / "img2dataset"
    cmd = img2dataset_command(find_binary(), url_list, out_dir, options, shard_size)
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=console is None, text=True)
    if proc.returncode != 0:
        raise OvisDataError(f"img2dataset failed (exit {proc.returncode}): {(proc.stderr or '')[-2000:]}")
    elapsed = time.monotonic() - start
    atomic = AtomicFiles(book / "tmp" / "img2dataset")
    atomic.clean()
    run = {
        "layout": layout,
        "shard_size": shard_size,
        "total_rows": url_list.total_rows,
        "engine": "img2dataset",
    }
    atomic.write_json(book / "run.json", {**run, "url_list": str(url_list.path)})
    success, failed = 0, Counter()
    for status in sorted(out_dir.glob("[0-9]*.parquet")):
        name = status.name[: -len(".parquet")]
        if not (out_dir / f"{name}_stats.json").exists():
            continue  # an unfinished shard: img2dataset redoes it next time
        table = _with_error_class(pq.read_table(status))
        ok = pc.sum(pc.equal(table["status"], "success")).as_py() or 0
        success += ok
        failed.update(c for c in table["error_class"].to_pylist() if c)
        if layout == "shards":
            atomic.write_parquet(status, table)
        else:
            _unpack(out_dir / f"{name}.tar", image_dir, url_list.image_path_column, atomic)
            atomic.write_parquet(book / f"{name}.parquet", table)
            stats = {"shard": name, "count": table.num_rows, "successes": ok, "engine": "img2dataset"}
            stats["failed"] = dict(Counter(c for c in table["error_class"].to_pylist() if c))
            atomic.write_json(book / f"{name}_stats.json", stats)
    if layout == "shards":
        build_index(image_dir)
    else:
        shutil.rmtree(out_dir, ignore_errors=True)
    return FetchReport(
        dataset=label or url_list.path.name,
        total=url_list.total_rows,
        success=success,
        failed=dict(failed.most_common()),
        elapsed_s=round(elapsed, 3),
        images_per_s=round(success / elapsed, 2) if elapsed > 0 else 0.0,
        image_dir=str(image_dir),
        layout=layout,
        engine="img2dataset",
    )


def _with_error_class(table: pa.Table) -> pa.Table:
    classes = [
        None if s == "success" else error_class(m)
        for s, m in zip(table["status"].to_pylist(), table["error_message"].to_pylist(), strict=True)
    ]
    if "error_class" in table.column_names:
        table = table.drop_columns(["error_class"])
    return table.append_column("error_class", pa.array(classes, pa.string()))


def _unpack(tar_path: Path, image_dir: Path, path_column: str, atomic: AtomicFiles) -> None:
    """Each image of an img2dataset tar to image_dir/<image_path>, streaming: a sample's members are
    adjacent, so at most one image waits for its json (which names the path)."""
    images: dict[str, bytes] = {}
    paths: dict[str, str] = {}
    with tarfile.open(tar_path) as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, _, ext = m.name.rpartition(".")
            data = tf.extractfile(m).read()  # type: ignore[union-attr]
            if ext == "json":
                paths[key] = json.loads(data).get(path_column) or ""
            elif ext in ("jpg", "jpeg", "png", "webp"):
                images[key] = data
            for k in [k for k in images if k in paths]:
                path = paths.pop(k)
                if path and not unsafe_path_reason(path):
                    atomic.write(image_dir / path, images[k])
                del images[k]
