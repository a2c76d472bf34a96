"""Where the pack stage's tasks run: in this process, a process pool or Ray tasks, each process holding
one `PackWorker` that its tasks share (made by the pool's initializer, or once per pack run in a Ray
worker). A task is a `PackWorker` method and its arguments."""

from __future__ import annotations

import multiprocessing as mp
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import numpy as np

from ..interrupt import cancel_pending, quiet_on_sigint, run_task
from ..lifeline import exit_with
from ..poolsize import workers_for
from .worker import PackConfig, PackWorker, Unit

Progress = Callable[[str, int, int], None]  # (phase "tokenize" | "write", samples | records done, total)

# Work under which a phase runs in this process sooner than in a pool (ovis_data.poolsize): tokenizing goes
# at 20-160k samples/s a core, writing at ~4k samples/s, and each pool worker first loads the tokenizer.
# The demo's stages 2 and 3: 6.5 s -> 4.4 s each.
SMALL_PHASE = {"tokenize": 20_000, "write": 1_000}  # samples to tokenize, records to write


# -- worker state (one per process) -------------------------------------------------------------------
_worker: PackWorker | None = None


def _init_worker(cfg: PackConfig, backend_json: str, units: list[Unit] | None, bases: np.ndarray | None):
    global _worker
    quiet_on_sigint()  # Ctrl-C: the running task stops (a shard's .tmp removed), no traceback
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # processes are the parallelism here
    _worker = PackWorker(cfg, backend_json, units, bases)


def _init_pool_worker(owner: int, *init: Any) -> None:
    exit_with(owner)  # a SIGKILLed pack leaves no worker behind
    _init_worker(*init)


def _call(fn: Callable, *args: Any) -> Any:
    """One task in a pool's process: the method `fn` of the worker its initializer made."""
    return run_task(fn, _worker, *args)


def run_tasks(
    fn: Callable,
    tasks: list[tuple],
    processes: int | None,
    init: tuple,
    label: str,
    progress: Progress | None,
    weights: list[int],
    ray: str | None = None,
):
    """Run fn(worker, *task) (fn: a `PackWorker` method) for every task, in this process, a pool or (ray:
    an address) as Ray tasks; results in completion order. Progress counts what the tasks hold (`weights`:
    samples to tokenize, records to write), not the tasks."""
    if ray is not None:
        return _run_ray(fn, tasks, init, label, progress, weights, ray)
    results = []
    total, done = sum(weights), 0
    processes = workers_for(processes, total, SMALL_PHASE[label])
    if progress:
        progress(label, 0, total)
    if processes <= 1 or len(tasks) <= 1:
        # In this process: a worker of its own, and the tokenizer may use every core (as the user's
        # environment allows: TOKENIZERS_PARALLELISM is left as it is).
        worker = PackWorker(*init)
        for t, w in zip(tasks, weights, strict=True):
            results.append(fn(worker, *t))
            done += w
            if progress:
                progress(label, done, total)
        return results
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(
        processes, mp_context=ctx, initializer=_init_pool_worker, initargs=(os.getpid(), *init)
    )
    with pool:
        futures = {pool.submit(_call, fn, *t): w for t, w in zip(tasks, weights, strict=True)}
        try:
            for fut in as_completed(futures):
                results.append(fut.result())
                done += futures[fut]
                if progress:
                    progress(label, done, total)
        except KeyboardInterrupt:  # queued tasks never start; the running ones stop at their own SIGINT
            cancel_pending(pool)
            raise
    return results


def _ray_task(fn: Callable, init: tuple, run: str, *args: Any) -> Any:
    """One pack task in a Ray worker: the worker state is set up once per pack run (`run`: a token unique
    to it, so a second run with the same settings in a long-lived worker never reuses the first one's
    open work files), as a pool's initializer does, then kept for the tasks that follow."""
    if _worker is None or _worker.ray_run != run:
        _init_worker(*init)
        _worker.ray_run = run
    return fn(_worker, *args)


def _run_ray(fn: Callable, tasks: list[tuple], init: tuple, label: str, progress, weights, address: str):
    """Tokenization units and shards as Ray tasks (one CPU each; lost ones retried). The plan stays here,
    and a shard's bytes depend only on its task's inputs: the same shards as a local run."""
    from ..fetch.ray_engine import TASK_RETRIES, connect

    ray = connect(address)
    init_ref = ray.put(init)
    remote = ray.remote(_ray_task).options(num_cpus=1, max_retries=TASK_RETRIES)
    run = uuid.uuid4().hex
    futures = {remote.remote(fn, init_ref, run, *t): w for t, w in zip(tasks, weights, strict=True)}
    total, done, results = sum(weights), 0, []
    if progress:
        progress(label, 0, total)
    pending = list(futures)
    while pending:
        finished, pending = ray.wait(pending, num_returns=1)
        results.append(ray.get(finished[0]))
        done += futures[finished[0]]
        if progress:
            progress(label, done, total)
    return results
