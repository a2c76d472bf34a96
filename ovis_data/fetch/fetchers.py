"""Worker processes that download and process rows: each runs its own event loop and aiohttp session.

Why downloads happen in the workers: when the main process downloaded every image and handed each body
(~200 KiB) to a decoding pool, it spent ~0.65 ms of CPU per image on aiohttp, pipe copies and pickling.
On 2 cores that cost a fifth of the throughput, and it bounds a run at ~1 / 0.65 ms = ~1,500 images/s
whatever the core count. Here the main process only hands out (url, hash) jobs and receives each
processed image (tens of KiB), so every core adds both network and decoding capacity.

Each worker decodes inline in its event loop (bodies wait in the kernel's socket buffers meanwhile).
Before decoding it writes the job's token and the time into a slot shared with the main process, so:
  - a worker that dies (a decoder crash) fails only the job in its slot (`worker_crash`); the other jobs
    it was downloading are handed to the other workers (at most twice each);
  - a job decoding for longer than `process_deadline_s` (a wedged decoder) gets its worker killed and
    replaced, and that job alone ends as `watchdog`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import math
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from . import classes as C
from .frames import FrameReader, FrameWriter, default_processes, encode_frame, widen_pipe, write_all
from .images import ImageParams, Processed
from .net import Downloader, NetParams

PROCESSOR = "ovis_data.fetch.images:process_image"
IDLE = -1  # slot token while a worker is not decoding
MAX_HANDOVERS = 2  # a job whose worker died this often while downloading it fails as worker_crash
WATCH_EVERY_S = 0.25
RESULTS_EVERY_S = 0.02


@dataclass
class Fetched:
    """What became of one job: a failure class (or success) with the processed image."""

    status: str
    detail: str = ""
    attempts: int = 0
    final_url: str = ""
    image: Processed | None = None


def _load(processor: str) -> Callable[..., Processed]:
    module, _, name = processor.partition(":")
    return getattr(importlib.import_module(module), name)


# -- worker side --------------------------------------------------------------------------------------
def _serve(
    tasks: Connection,
    results: Connection,
    slot: Any,
    net: NetParams,
    image: ImageParams,
    processor: str,
) -> None:
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):  # Ctrl-C reaches the whole group
        asyncio.run(_serve_loop(tasks.fileno(), results.fileno(), slot, net, image, _load(processor)))


async def _serve_loop(
    rfd: int, wfd: int, slot: Any, net: NetParams, image: ImageParams, process: Callable[..., Processed]
) -> None:
    loop = asyncio.get_running_loop()
    closed = loop.create_future()
    jobs: list[tuple[int, str, str | None, float]] = []
    reader = FrameReader(rfd, jobs.extend)  # a frame carries a list of (token, url, sha256, deadline_s)
    # Never blocks: while the main process is not scheduled, this worker goes on decoding. Results go
    # out every RESULTS_EVERY_S: each wakeup of the main process preempts a decoding worker (measured on
    # 2 cores: 80-81% of the CPU ceiling with a write per result, 84-85% with this).
    results = FrameWriter(wfd, loop, coalesce_s=RESULTS_EVERY_S)
    running: set[asyncio.Task] = set()

    async def job(token: int, url: str, sha: str | None, deadline_s: float) -> None:
        try:
            async with asyncio.timeout(deadline_s):
                dl = await downloader.fetch(url)
        except TimeoutError:
            results.send((token, Fetched(C.WATCHDOG, f"download overran {deadline_s:.0f}s")))
            return
        if dl.status != C.SUCCESS:
            results.send((token, Fetched(dl.status, dl.detail, dl.attempts, dl.final_url)))
            return
        slot[1] = time.monotonic_ns()
        slot[0] = token
        try:
            out = process(dl.data, image, sha)
        except Exception as e:  # process_image classifies what it knows; anything else is a bug
            out = Processed(C.WORKER_CRASH, f"{type(e).__name__}: {e}"[:200])
        finally:
            slot[0] = IDLE
        results.send((token, Fetched(out.status, out.detail, dl.attempts, dl.final_url, out)))

    def on_readable() -> None:
        if not reader.read() and not closed.done():  # the main process closed our pipe (done, or gone)
            closed.set_result(None)
        for args in jobs:
            t = loop.create_task(job(*args))
            running.add(t)
            t.add_done_callback(running.discard)
        jobs.clear()

    async with Downloader(net) as downloader:
        loop.add_reader(rfd, on_readable)
        await closed
        loop.remove_reader(rfd)
        for t in running:
            t.cancel()


# -- main side ----------------------------------------------------------------------------------------
class _Job:
    __slots__ = ("token", "url", "sha", "deadline_s", "future", "handovers")

    def __init__(self, token: int, url: str, sha: str | None, deadline_s: float, future: asyncio.Future):
        self.token = token
        self.url = url
        self.sha = sha
        self.deadline_s = deadline_s
        self.future = future
        self.handovers = 0


class _Worker:
    def __init__(self, ctx: Any, args: tuple) -> None:
        task_r, self.task_w = ctx.Pipe(duplex=False)
        self.result_r, result_w = ctx.Pipe(duplex=False)
        widen_pipe(self.task_w.fileno())
        widen_pipe(self.result_r.fileno())
        self.slot = ctx.RawArray("q", 2)  # (token being decoded or IDLE, monotonic ns it started)
        self.slot[0] = IDLE
        self.proc = ctx.Process(target=_serve, args=(task_r, result_w, self.slot, *args), daemon=True)
        self.proc.start()
        task_r.close()
        result_w.close()
        self.wfd, self.rfd = self.task_w.fileno(), self.result_r.fileno()
        self.jobs: dict[int, _Job] = {}  # sent, no result yet
        self.outbox: list[tuple[int, str, str | None, float]] = []  # to send at the end of this tick
        self.reader: FrameReader | None = None
        self.alive = True

    def close(self) -> None:
        self.task_w.close()
        self.result_r.close()


class Fetchers:
    """`await fetchers.fetch(url, sha256, deadline_s)` -> Fetched, downloaded and processed in a worker.
    Jobs go to the worker with the fewest in flight; at most `concurrency` in flight over all."""

    def __init__(
        self,
        processes: int,
        net: NetParams,
        image: ImageParams,
        process_deadline_s: float = 120.0,
        processor: str = PROCESSOR,
    ) -> None:
        self.processes = processes or default_processes()
        # Each worker's session gets its share of the connection bounds.
        share = replace_net(net, self.processes)
        self._args = (share, image, processor)
        self.process_deadline_ns = int(process_deadline_s * 1e9)
        # forkserver: workers never inherit the event loop's threads or sockets; PIL and aiohttp load once.
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload([f"{__package__}.images", f"{__package__}.net"])
        self._workers = [_Worker(self._ctx, self._args) for _ in range(self.processes)]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._flush_scheduled = False
        self._next_token = 0

    async def fetch(self, url: str, sha256: str | None, deadline_s: float) -> Fetched:
        loop = self._attach()
        self._next_token += 1
        job = _Job(self._next_token, url, sha256, deadline_s, loop.create_future())
        self._assign(job)
        try:
            return await job.future
        except asyncio.CancelledError:  # the caller gave up (stall watchdog): a late result is dropped
            for w in self._workers:
                w.jobs.pop(job.token, None)
            raise

    def close(self) -> None:
        """EOF to every worker; one still busy after a grace period (wedged in a decoder) is killed."""
        if self._watch is not None:
            self._watch.cancel()
        for w in self._workers:
            self._detach(w)
            w.close()
        for w in self._workers:
            w.proc.join(timeout=2)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()

    # -- plumbing (event loop thread only) --
    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new asyncio.run: readers and timers belong to one loop
            self._loop = loop
            for w in self._workers:
                self._listen(w)
            self._watch = loop.call_later(WATCH_EVERY_S, self._watchdog)
        return loop

    def _listen(self, w: _Worker) -> None:
        w.reader = FrameReader(w.rfd, lambda reply: self._on_result(w, reply))
        self._loop.add_reader(w.rfd, self._on_readable, w)  # type: ignore[union-attr]

    def _detach(self, w: _Worker) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(w.rfd)

    def _assign(self, job: _Job) -> None:
        w = min(self._workers, key=lambda w: len(w.jobs))
        w.jobs[job.token] = job
        w.outbox.append((job.token, job.url, job.sha, job.deadline_s))
        if not self._flush_scheduled:  # one write per worker per loop tick, not one per job
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)  # type: ignore[union-attr]

    def _flush(self) -> None:
        self._flush_scheduled = False
        for w in self._workers:
            if w.outbox and w.alive:
                frame, w.outbox = encode_frame(w.outbox), []
                try:
                    write_all(w.wfd, frame)  # blocking: a few hundred bytes, the worker always reads
                except OSError:  # BrokenPipeError: it died; its result pipe reports EOF too
                    self._lost(w)

    def _on_readable(self, w: _Worker) -> None:
        assert w.reader is not None
        if not w.reader.read():
            self._lost(w)

    def _on_result(self, w: _Worker, reply: tuple[int, Fetched]) -> None:
        token, result = reply
        job = w.jobs.pop(token, None)
        if job is not None and not job.future.done():
            job.future.set_result(result)

    def _watchdog(self) -> None:
        now = time.monotonic_ns()
        for w in list(self._workers):
            token = w.slot[0]
            if w.alive and token != IDLE and now - w.slot[1] > self.process_deadline_ns:
                detail = f"processing overran {self.process_deadline_ns / 1e9:.0f}s"
                self._lost(w, (C.WATCHDOG, detail))
        self._watch = self._loop.call_later(WATCH_EVERY_S, self._watchdog)  # type: ignore[union-attr]

    def _lost(self, w: _Worker, reason: tuple[str, str] | None = None) -> None:
        """A worker died or was killed: its decoding job fails, the others go to live workers."""
        if not w.alive:
            return
        w.alive = False
        self._detach(w)
        w.close()
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join()
        culprit = w.slot[0]
        if reason is None:
            reason = (C.WORKER_CRASH, f"its worker process died (exit code {w.proc.exitcode})")
        fresh = _Worker(self._ctx, self._args)
        self._workers[self._workers.index(w)] = fresh
        self._listen(fresh)
        for token, job in w.jobs.items():
            if job.future.done():
                continue
            job.handovers += 1
            if token == culprit:
                job.future.set_result(Fetched(*reason, attempts=1))
            elif job.handovers > MAX_HANDOVERS:
                job.future.set_result(Fetched(C.WORKER_CRASH, "workers kept dying while downloading it"))
            else:
                self._assign(job)


def replace_net(net: NetParams, processes: int) -> NetParams:
    """One worker's share of the connection bounds (each worker has its own session)."""
    return replace(
        net,
        concurrency=max(1, math.ceil(net.concurrency / processes)),
        per_host=max(1, math.ceil(net.per_host / processes)),
    )
