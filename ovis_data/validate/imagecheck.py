"""Per-image checks run in worker processes: header (default) or full decode (--deep).

A worker gets (location, offset, size) triples: a file path with offset -1 for the files layout, or a
tar shard with the member's byte range for the shards layout. It returns (width, height, reason, detail)
with a stable snake_case reason, or reason None for a good image.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from ..interrupt import cancel_pending, quiet_on_sigint, run_task
from ..lifeline import exit_with
from ..storage import as_path, read_range

# Pillow's default limit (about 89.5 megapixels): a larger image is treated as a decompression bomb.
DEFAULT_MAX_PIXELS = 89_478_485
Location = tuple[str, int, int]
Result = tuple[int | None, int | None, str | None, str | None]


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = 1
    max_aspect: float | None = None  # longer side / shorter side


def _open(loc: Location) -> tuple[BinaryIO, int]:
    """A readable stream of the image and its size: the file itself, or the member's bytes in a shard."""
    path, offset, size = loc
    if "://" in path:  # object storage: one ranged GET (or the whole object), never a local open
        data = read_range(path, offset, size) if offset >= 0 else as_path(path).read_bytes()  # type: ignore[union-attr]
        if offset >= 0 and len(data) != size:
            raise OSError(f"short read of {size} bytes at offset {offset}")
        return io.BytesIO(data), len(data)
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller, closed there
    if offset < 0:
        return f, os.fstat(f.fileno()).st_size
    with f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"short read of {size} bytes at offset {offset}")
    return io.BytesIO(data), size


def _looks_truncated(fmt: str | None, stream: BinaryIO, size: int) -> bool:
    """Cheap end-of-stream check for header mode: a JPEG ends with EOI, a PNG with its IEND chunk."""
    if fmt not in ("JPEG", "PNG"):
        return False
    stream.seek(max(0, size - 64))
    tail = stream.read(64)
    return (b"\xff\xd9" if fmt == "JPEG" else b"IEND") not in tail


def check_image(loc: Location, deep: bool, limits: ImageLimits) -> Result:
    """Header mode reads the header and the last bytes only; deep mode decodes every pixel."""
    try:
        stream, size = _open(loc)
    except FileNotFoundError:
        return None, None, "missing_image", "file vanished during validation"
    except OSError as e:
        return None, None, "unreadable_file", str(e)
    with stream:
        if size == 0:
            return None, None, "empty_file", "0 bytes"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = Image.open(stream)
                width, height = img.size
                if width * height > limits.max_pixels:
                    detail = f"{width}x{height} exceeds {limits.max_pixels} pixels"
                    return width, height, "decompression_bomb", detail
                if deep:
                    img.load()
                elif _looks_truncated(img.format, stream, size):
                    return width, height, "truncated_image", f"{img.format} stream has no end marker"
        except UnidentifiedImageError:
            return None, None, "not_an_image", f"{size} bytes that no image decoder recognises"
        except Image.DecompressionBombError as e:
            return None, None, "decompression_bomb", str(e)
        except (OSError, SyntaxError, ValueError) as e:
            reason = "truncated_image" if "truncated" in str(e).lower() else "decode_error"
            return None, None, reason, str(e)
    if min(width, height) < limits.min_side:
        return width, height, "image_too_small", f"{width}x{height}, minimum side {limits.min_side}"
    if limits.max_aspect and max(width, height) / max(1, min(width, height)) > limits.max_aspect:
        return width, height, "extreme_aspect_ratio", f"{width}x{height}, limit {limits.max_aspect}:1"
    return width, height, None, None


def _check_chunk(args: tuple[list[Location], bool, ImageLimits]) -> list[Result]:
    locs, deep, limits = args
    return [check_image(loc, deep, limits) for loc in locs]


def _check_on_ray(tasks: Iterable[tuple], address: str) -> Iterator[list[Result]]:
    """Chunks as Ray tasks, results in order; in flight at most 4 per CPU of the cluster (10M paths never
    all submitted); a chunk lost with its node is run again."""
    from collections import deque

    from ..fetch.ray_engine import TASK_RETRIES, connect

    ray = connect(address)
    remote = ray.remote(_check_chunk).options(num_cpus=1, max_retries=TASK_RETRIES)
    window = max(4, 4 * int(ray.cluster_resources().get("CPU", 1)))
    pending: deque = deque()
    for task in tasks:
        pending.append(remote.remote(task))
        if len(pending) >= window:
            yield ray.get(pending.popleft())
    while pending:
        yield ray.get(pending.popleft())


def _init_pool_worker(owner: int) -> None:
    exit_with(owner)
    quiet_on_sigint()


# Images under which one process, the caller, checks a set sooner than a pool (ovis_data.poolsize): a
# header read takes ~0.1 ms an image, a full decode of a real photo a few ms. The demo's 19 datasets of a
# few dozen images each: 8.7 s -> 2.3 s.
SMALL_SET = {False: 4000, True: 200}  # by deep


def check_images(
    locations: Iterable[list[Location]],
    deep: bool,
    limits: ImageLimits,
    processes: int | None,
    ray: str | None = None,
) -> Iterator[list[Result]]:
    """Check chunks of locations in order, over `processes` worker processes (all cores by default), or
    as Ray tasks of one CPU on the cluster at `ray` (locations must be readable on every node)."""
    processes = processes or os.cpu_count() or 1
    tasks = ((chunk, deep, limits) for chunk in locations)
    if ray is not None:
        yield from _check_on_ray(tasks, ray)
        return
    if processes == 1:
        yield from map(_check_chunk, tasks)
        return
    # forkserver: the caller runs DuckDB's threads; forking a multi-threaded process can deadlock the child
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    # Ctrl-C: the running chunks stop, queued ones never start, no traceback (ovis_data.interrupt);
    # exit_with: a SIGKILLed validate leaves no worker behind
    init = {"initializer": _init_pool_worker, "initargs": (os.getpid(),)}
    pool = ProcessPoolExecutor(processes, mp_context=ctx, **init)
    with pool:
        # map() submits everything up front; bound the in-flight chunks so 10M paths never sit in memory.
        pending = []
        try:
            for task in tasks:
                pending.append(pool.submit(run_task, _check_chunk, task))
                if len(pending) >= processes * 4:
                    yield pending.pop(0).result()
            for fut in pending:
                yield fut.result()
        except BaseException:  # KeyboardInterrupt, or the caller closing this generator
            cancel_pending(pool)
            raise
