"""The fetch worker pool under failure: a crash or a hang costs only its own image, never the run."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures.process import BrokenProcessPool

from pool_work import work

from ovis_data.fetch.pool import WorkerPool


async def _outcomes(pool: WorkerPool, items: list) -> list:
    async def one(x: object) -> object:
        try:
            # The deadline counts queueing too: only the hanging task gets a short one.
            return await pool.run(work, x, timeout=1.5 if x == "hang" else 30.0)
        except (BrokenProcessPool, TimeoutError, ValueError) as e:
            return type(e).__name__

    return await asyncio.gather(*(one(x) for x in items))


def test_crash_hang_and_exception_fail_only_their_own_task():
    pool = WorkerPool(2)
    try:
        items = [1, 2, "crash", 3, "hang", 4, "raise", 5, 6]
        started = time.perf_counter()
        got = asyncio.run(_outcomes(pool, items))
        assert got == [2, 4, "BrokenProcessPool", 6, "TimeoutError", 8, "ValueError", 10, 12]
        assert time.perf_counter() - started < 30, "a hung worker must be replaced, not waited for"
        # The replaced workers serve a later run on a new event loop.
        assert asyncio.run(_outcomes(pool, list(range(10)))) == [2 * i for i in range(10)]
    finally:
        pool.close()
