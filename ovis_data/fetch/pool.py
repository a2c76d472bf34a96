"""Worker processes for the CPU work (decode, resize, encode), fed by the event loop through pipes.

Why not ProcessPoolExecutor: per image it cost the main process a wakeup write, a feeder thread and a
manager thread (each needing the GIL) and several copies of a ~200 KiB body; that was ~0.4 ms of CPU per
image on the cores the decoders need. Here each worker has its own pair of pipes carrying frames (a
pickle, with large bytes such as image bodies beside it, not copied into it); the event loop writes and
reads them itself (non-blocking), and each worker has a task queued behind the one it runs, so it never
waits for the main process to be scheduled.

A worker that dies fails only the task it was running (BrokenProcessPool: the caller records a
worker_crash) and is replaced; the tasks queued behind it go to the others. A task that overruns its
timeout while running gets its worker killed and replaced (it may be wedged in a decoder).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import multiprocessing
import os
import pickle
import struct
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection
from typing import Any, TypeVar

T = TypeVar("T")
DEPTH = 2  # tasks sent to a worker ahead of its results: one running, one waiting in its pipe
PIPE_BYTES = 1 << 20  # whole images fit (Linux's default pipe-max-size for unprivileged processes)
OUT_OF_BAND = 1 << 15  # bytes this long travel beside the pickle, not copied into (and out of) it


def default_processes() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# -- frames: [pickle length, buffer count][buffer lengths][pickle][buffers] ------------------------------
def _same(x: Any) -> Any:
    return x


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is bytes and len(obj) >= OUT_OF_BAND:
            return _same, (pickle.PickleBuffer(obj),)
        return NotImplemented


def _encode(obj: Any) -> list[bytes | memoryview]:
    buffers: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    _Pickler(out, protocol=5, buffer_callback=buffers.append).dump(obj)
    raws = [b.raw() for b in buffers]
    head = struct.pack(f"<QQ{len(raws)}Q", out.tell(), len(raws), *(r.nbytes for r in raws))
    return [head, out.getbuffer(), *raws]


def _decoder(deliver: Callable[[Any], None]) -> Generator[int, bytes, None]:
    """Send it bytes in the sizes it yields; it delivers each object as its frame completes."""
    while True:
        size, count = struct.unpack("<QQ", (yield 16))
        sizes = struct.unpack(f"<{count}Q", (yield 8 * count)) if count else ()
        meta = yield size
        buffers = []
        for n in sizes:
            buffers.append((yield n))
        deliver(pickle.loads(meta, buffers=buffers))


# -- worker side --------------------------------------------------------------------------------------
def _read_exact(fd: int, n: int) -> bytes | None:
    parts = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            return None
        parts.append(chunk)
        n -= len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _write_all(fd: int, parts: list[bytes | memoryview]) -> None:
    views = [memoryview(p) for p in parts]
    while views:
        k = os.writev(fd, views)
        while views and k >= len(views[0]):
            k -= len(views.pop(0))
        if views:
            views[0] = views[0][k:]


def _serve(tasks: Connection, results: Connection) -> None:
    """A worker's loop: run each task, send back (ok, value); end at EOF (the pool closed, or died)."""
    rfd, wfd = tasks.fileno(), results.fileno()
    received: list[tuple[Callable[..., Any], tuple]] = []
    decoder = _decoder(received.append)
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):  # Ctrl-C reaches the whole group
        need = next(decoder)
        while (data := _read_exact(rfd, need)) is not None:
            need = decoder.send(data)
            if not received:
                continue
            fn, args = received.pop()
            try:
                reply = _encode((True, fn(*args)))
            except Exception as e:  # the caller sees the exception, as with an executor
                try:
                    reply = _encode((False, e))
                except Exception:
                    reply = _encode((False, RuntimeError(repr(e))))
            _write_all(wfd, reply)


def _widen(fd: int) -> None:
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        with contextlib.suppress(OSError):  # e.g. a lowered /proc/sys/fs/pipe-max-size: still works
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


# -- main side ----------------------------------------------------------------------------------------
class _Task:
    __slots__ = ("frame", "future")

    def __init__(self, frame: list[bytes | memoryview], future: asyncio.Future) -> None:
        self.frame = frame
        self.future = future


class _Worker:
    """One process and the main process's ends of its pipes; results arrive in the order tasks went."""

    def __init__(self, ctx: Any, on_result: Callable[[_Worker, Any], None]) -> None:
        task_r, self.task_w = ctx.Pipe(duplex=False)
        self.result_r, result_w = ctx.Pipe(duplex=False)
        _widen(self.task_w.fileno())
        _widen(self.result_r.fileno())
        self.proc = ctx.Process(target=_serve, args=(task_r, result_w), daemon=True)
        self.proc.start()
        task_r.close()
        result_w.close()
        self.wfd, self.rfd = self.task_w.fileno(), self.result_r.fileno()
        os.set_blocking(self.wfd, False)
        os.set_blocking(self.rfd, False)
        self.outstanding: deque[_Task] = deque()  # sent, result not yet read; [0] is running
        self.unsent: deque[memoryview] = deque()  # bytes not yet accepted by the task pipe
        self.decoder = _decoder(lambda reply: on_result(self, reply))
        self.need = next(self.decoder)  # bytes the decoder wants next
        self.parts: list[bytes] = []
        self.got = 0
        self.alive = True

    def close(self) -> None:
        self.task_w.close()
        self.result_r.close()


class WorkerPool:
    def __init__(self, processes: int) -> None:
        self.processes = processes or default_processes()
        # forkserver: workers never inherit the event loop's threads or sockets (fork from a threaded
        # process can deadlock); it starts once, so the cost is paid once per run.
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload([f"{__package__}.images"])  # workers start with PIL loaded
        # Started now, while the run reads its first shard.
        self._workers = [_Worker(self._ctx, self._on_result) for _ in range(self.processes)]
        self._pending: deque[_Task] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """fn(*args) in a worker. TimeoutError after `timeout` s (queue included); a worker that was
        running it is replaced. BrokenProcessPool when the worker running it died."""
        loop = self._attach()
        task = _Task(_encode((fn, args)), loop.create_future())
        self._pending.append(task)
        self._dispatch()
        timer = None if timeout is None else loop.call_later(timeout, self._expire, task, timeout)
        try:
            ok, value = await task.future
        except asyncio.CancelledError:
            self._abandon(task, kill=False)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """EOF to every worker; one still busy after a grace period (wedged in a decoder) is killed."""
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
        if self._loop is not loop:  # a new asyncio.run: readers belong to one loop
            self._loop = loop
            for w in self._workers:
                loop.add_reader(w.rfd, self._on_readable, w)
        return loop

    def _detach(self, w: _Worker) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(w.rfd)
            self._loop.remove_writer(w.wfd)

    def _dispatch(self) -> None:
        while self._pending:
            w = min(self._workers, key=lambda w: len(w.outstanding))
            if len(w.outstanding) >= DEPTH:
                return
            task = self._pending.popleft()
            w.outstanding.append(task)
            w.unsent.extend(memoryview(b).cast("B") for b in task.frame)
            self._on_writable(w)

    def _on_writable(self, w: _Worker) -> None:
        try:
            while w.unsent:
                k = os.writev(w.wfd, list(w.unsent))
                while w.unsent and k >= len(w.unsent[0]):
                    k -= len(w.unsent.popleft())
                if w.unsent:
                    w.unsent[0] = w.unsent[0][k:]
        except BlockingIOError:
            self._loop.add_writer(w.wfd, self._on_writable, w)  # type: ignore[union-attr]
            return
        except OSError:  # BrokenPipeError: it died; its result pipe reports EOF too
            self._lost(w)
            return
        self._loop.remove_writer(w.wfd)  # type: ignore[union-attr]

    def _on_readable(self, w: _Worker) -> None:
        try:
            while True:
                chunk = os.read(w.rfd, w.need - w.got)
                if not chunk:
                    self._lost(w)
                    return
                w.parts.append(chunk)
                w.got += len(chunk)
                if w.got < w.need:
                    continue
                data = w.parts[0] if len(w.parts) == 1 else b"".join(w.parts)
                w.parts, w.got = [], 0
                w.need = w.decoder.send(data)
                while w.need == 0:
                    w.need = w.decoder.send(b"")
        except BlockingIOError:
            return
        except OSError:
            self._lost(w)

    def _on_result(self, w: _Worker, reply: Any) -> None:
        task = w.outstanding.popleft()
        if not task.future.done():  # done: cancelled or timed out, the result is not wanted
            task.future.set_result(reply)
        self._dispatch()

    def _expire(self, task: _Task, timeout: float) -> None:
        if not task.future.done():
            task.future.set_exception(TimeoutError(f"not processed within {timeout:.0f}s"))
            self._abandon(task, kill=True)

    def _abandon(self, task: _Task, kill: bool) -> None:
        """The caller stopped waiting: drop the task if unsent; kill its worker if it is running it."""
        if task in self._pending:
            self._pending.remove(task)
            return
        for w in self._workers:
            if w.outstanding and w.outstanding[0] is task and kill:
                self._lost(w)
                return

    def _lost(self, w: _Worker) -> None:
        """A worker died (or was killed): fail its running task, requeue the rest, start a replacement."""
        if not w.alive:
            return
        w.alive = False
        self._detach(w)
        w.close()
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join()
        running = w.outstanding.popleft() if w.outstanding else None
        if running is not None and not running.future.done():
            running.future.set_exception(
                BrokenProcessPool(f"a worker process died (exit code {w.proc.exitcode}) on this task")
            )
        self._pending.extendleft(reversed(w.outstanding))
        fresh = _Worker(self._ctx, self._on_result)
        self._workers[self._workers.index(w)] = fresh
        self._loop.add_reader(fresh.rfd, self._on_readable, fresh)  # type: ignore[union-attr]
        self._dispatch()
