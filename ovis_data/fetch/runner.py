"""Run a fetch's planned shards: asyncio keeps a bounded number of rows in flight across at most
`shards_in_flight` shards; each row is downloaded and processed by a worker process (fetchers.py), then
written by this process; a shard's records and stats go to its writer when its last row is in.
A watchdog ends rows that overrun their deadline and shards where nothing finishes for `stall_s`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..imagestore import unsafe_path_reason
from . import classes as C
from .fetchers import Fetchers
from .images import Processed
from .progress import Monitor
from .reader import ShardRows, UrlList, read_rows
from .writer import AtomicFiles, FilesShard, TarShard, shard_name

if TYPE_CHECKING:
    from .options import FetchOptions


@dataclass
class ShardPlan:
    shard_id: int
    start: int
    stop: int
    rows: list[int] | None = None  # offsets in the shard to (re)attempt; None: all
    previous: list[dict[str, Any]] = field(default_factory=list)  # earlier records (retry_failed)


class Runner:
    def __init__(
        self,
        url_list: UrlList,
        image_dir: Path,
        layout: str,
        shard_size: int,
        opts: FetchOptions,
        monitor: Monitor,
        atomic: AtomicFiles,
        fetchers: Fetchers,
    ) -> None:
        self.url_list = url_list
        self.image_dir = image_dir
        self.layout = layout
        self.opts = opts
        self.monitor = monitor
        self.atomic = atomic
        self.fetchers = fetchers
        self.key_width = max(4, len(str(shard_size - 1)))
        net = opts.net
        self.row_deadline = opts.row_deadline_s or (
            (net.retries + 1) * (net.total_timeout + net.backoff_max_s) + net.total_timeout
        )
        self.last_progress = time.monotonic()
        self.finished_shards: list[int] = []
        self.on_shard: Callable[[int], None] | None = None

    async def run(self, plan: list[ShardPlan]) -> None:
        if not plan:
            return
        self.sem = asyncio.Semaphore(self.opts.net.concurrency)
        queue = list(reversed(plan))

        async def worker() -> None:
            while queue:
                await self.shard(queue.pop())

        await asyncio.gather(*(worker() for _ in range(min(self.opts.shards_in_flight, len(plan)))))

    async def shard(self, p: ShardPlan) -> None:
        started = time.time()
        rows = await asyncio.to_thread(read_rows, self.url_list, p.start, p.stop)
        writer: FilesShard | TarShard
        if self.layout == "shards":
            writer = TarShard(self.image_dir, p.shard_id, self.atomic, self.opts.durable)
            old_tar = self.image_dir / f"{shard_name(p.shard_id)}.tar"
            if p.rows is not None and old_tar.exists():
                await asyncio.to_thread(writer.copy_from, old_tar)
        else:
            writer = FilesShard(self.image_dir, p.shard_id, self.atomic, self.opts.durable)
        records = {r["row"]: r for r in p.previous}
        offsets = p.rows if p.rows is not None else range(len(rows))
        tasks = {asyncio.create_task(self.row(p.shard_id, rows, i, writer)): i for i in offsets}
        try:
            await self._collect(p, rows, tasks, records)
        except BaseException:
            for t in tasks:
                t.cancel()
            writer.abort()
            raise
        stats = self._stats(p, records, started)
        await asyncio.to_thread(writer.finish, list(records.values()), stats)
        if self.on_shard is not None:
            await asyncio.to_thread(self.on_shard, p.shard_id)
        self.finished_shards.append(p.shard_id)

    async def _collect(
        self, p: ShardPlan, rows: ShardRows, tasks: dict[asyncio.Task, int], records: dict[int, dict]
    ) -> None:
        # Finished tasks arrive through a queue: asyncio.wait over all pending tasks would cost
        # O(shard size) per completion, O(n^2) per shard.
        finished: asyncio.Queue[asyncio.Task] = asyncio.Queue()
        for t in tasks:
            t.add_done_callback(finished.put_nowait)
        remaining = len(tasks)
        tick = min(1.0, self.opts.stall_s / 4)
        while remaining:
            try:
                t = await asyncio.wait_for(finished.get(), tick)
            except TimeoutError:
                if time.monotonic() - self.last_progress > self.opts.stall_s:
                    remaining -= await self._end_stuck(p, rows, tasks, records, finished)
                continue
            while True:
                rec = t.result()
                records[rec["row"]] = rec
                self.monitor.row(rec["error_class"] or C.SUCCESS)
                remaining -= 1
                if finished.empty():
                    break
                t = finished.get_nowait()
            self.last_progress = time.monotonic()

    async def _end_stuck(
        self,
        p: ShardPlan,
        rows: ShardRows,
        tasks: dict[asyncio.Task, int],
        records: dict[int, dict],
        finished: asyncio.Queue[asyncio.Task],
    ) -> int:
        """Watchdog: nothing anywhere finished for stall_s; end this shard's stuck rows as `watchdog`."""
        stuck = [t for t in tasks if not t.done()]
        for t in stuck:
            t.remove_done_callback(finished.put_nowait)  # recorded here, not by the collector
            t.cancel()
        await asyncio.gather(*stuck, return_exceptions=True)
        for t in stuck:
            rec = self._record(p.shard_id, rows, tasks[t])
            self._fail(rec, C.WATCHDOG, f"no progress for {self.opts.stall_s:.0f}s")
            records[rec["row"]] = rec
            self.monitor.row(C.WATCHDOG)
        self.monitor.warn(f"watchdog ended {len(stuck)} stuck rows of shard {shard_name(p.shard_id)}")
        self.last_progress = time.monotonic()
        return len(stuck)

    def _record(self, shard_id: int, rows: ShardRows, i: int) -> dict[str, Any]:
        path = rows.image_paths[i]
        return {
            "row": rows.start + i,
            "key": f"{shard_name(shard_id)}{i:0{self.key_width}d}",
            "image_path": None if path is None else str(path),
            "url": rows.urls[i],
            "status": "success",
            "error_class": None,
            "error_message": None,
            "attempts": 0,
        }

    @staticmethod
    def _fail(rec: dict[str, Any], cls: str, detail: str = "") -> dict[str, Any]:
        rec.update(status="failed", error_class=cls, error_message=detail or None)
        return rec

    async def row(
        self, shard_id: int, rows: ShardRows, i: int, writer: FilesShard | TarShard
    ) -> dict[str, Any]:
        rec = self._record(shard_id, rows, i)
        url, path = rec["url"], rec["image_path"]
        if not url:
            return self._fail(rec, C.MISSING_URL)
        if path is None or unsafe_path_reason(path):
            return self._fail(rec, C.BAD_PATH, unsafe_path_reason(path or ""))
        async with self.sem:
            got = await self.fetchers.fetch(url, rows.sha256[i], self.row_deadline)
            rec["attempts"] = got.attempts
            if got.status != C.SUCCESS:
                return self._fail(rec, got.status, got.detail)
            out: Processed | None = got.image
            assert out is not None
            info = {
                "sha256": out.sha256,
                "width": out.width,
                "height": out.height,
                "original_width": out.original_width,
                "original_height": out.original_height,
                "original_size": out.original_size,
                "original_sha256": out.original_sha256,
            }
            meta = {"key": rec["key"], "image_path": path, "url": url, "final_url": got.final_url, **info}
            assert out.data is not None
            writer.add(rec["key"], path, out.ext, out.data, meta)
            rec.update(info)
            return rec

    def _stats(self, p: ShardPlan, records: dict[int, dict], started: float) -> dict[str, Any]:
        failed = Counter(r["error_class"] for r in records.values() if r["error_class"])
        return {
            "shard": shard_name(p.shard_id),
            "rows": [p.start, p.stop],
            "count": len(records),
            "successes": len(records) - sum(failed.values()),
            "failed": dict(sorted(failed.items())),
            "start_time": started,
            "end_time": time.time(),
            "duration": time.time() - started,
            "engine": "ovis-data",
            "layout": self.layout,
            "image": asdict(self.opts.image),
        }
