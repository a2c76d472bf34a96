"""A process pool for the CPU work (decode, resize, encode) that survives a crashed or stuck worker."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

T = TypeVar("T")


def default_processes() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class WorkerPool:
    def __init__(self, processes: int) -> None:
        self.processes = processes or default_processes()
        # forkserver: workers never inherit the event loop's threads or sockets (fork from a threaded
        # process can deadlock); it starts once, so the cost is paid once per run.
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload([f"{__package__}.images"])  # workers start with PIL loaded
        self._pool = self._new()
        for _ in range(self.processes):  # start them now, while the run reads its first shard
            self._pool.submit(int)
        self.stuck = False  # set when a task overran its deadline: its worker may still be busy

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.processes, mp_context=self._ctx)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        pool = self._pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except BrokenProcessPool:
            # A worker died (segfault, OOM kill): replace the pool once; the caller records the row.
            if pool is self._pool:
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new()
            raise

    def close(self) -> None:
        pool = self._pool
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=not self.stuck, cancel_futures=True)
        if self.stuck:  # a wedged worker must not keep the interpreter from exiting
            for p in processes:
                p.terminate()
