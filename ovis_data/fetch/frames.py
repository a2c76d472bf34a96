"""Frames for the pipes between the main process and the fetch workers.

A frame is [pickle length, buffer count][buffer lengths][pickle][buffers]: large bytes (processed
images) travel beside the pickle, not copied into it and out again. Both ends read and write pipes
themselves from their event loops (non-blocking); ProcessPoolExecutor's feeder and manager threads cost
the main process ~0.4 ms of CPU per image on the cores the decoders need.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import os
import pickle
import struct
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

PIPE_BYTES = 1 << 20  # whole images fit (Linux's default pipe-max-size for unprivileged processes)
OUT_OF_BAND = 1 << 15  # bytes this long travel beside the pickle, not copied into (and out of) it


def default_processes() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _same(x: Any) -> Any:
    return x


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is bytes and len(obj) >= OUT_OF_BAND:
            return _same, (pickle.PickleBuffer(obj),)
        return NotImplemented


def encode_frame(obj: Any) -> list[bytes | memoryview]:
    buffers: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    _Pickler(out, protocol=5, buffer_callback=buffers.append).dump(obj)
    raws = [b.raw() for b in buffers]
    head = struct.pack(f"<QQ{len(raws)}Q", out.tell(), len(raws), *(r.nbytes for r in raws))
    return [head, out.getbuffer(), *raws]


def frame_decoder(deliver: Callable[[Any], None]) -> Generator[int, bytes, None]:
    """Send it bytes in the sizes it yields; it delivers each object as its frame completes."""
    while True:
        size, count = struct.unpack("<QQ", (yield 16))
        sizes = struct.unpack(f"<{count}Q", (yield 8 * count)) if count else ()
        meta = yield size
        buffers = []
        for n in sizes:
            buffers.append((yield n))
        deliver(pickle.loads(meta, buffers=buffers))


class FrameReader:
    """Feeds a pipe's bytes (made non-blocking) to a frame decoder: call `read()` when it is readable;
    it returns False at EOF (the other end closed or died)."""

    def __init__(self, fd: int, deliver: Callable[[Any], None]) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self._decoder = frame_decoder(deliver)
        self._need = next(self._decoder)
        self._parts: list[bytes] = []
        self._got = 0

    def read(self) -> bool:
        try:
            while True:
                chunk = os.read(self.fd, self._need - self._got)
                if not chunk:
                    return False
                self._parts.append(chunk)
                self._got += len(chunk)
                if self._got < self._need:
                    continue
                data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
                self._parts, self._got = [], 0
                self._need = self._decoder.send(data)
                while self._need == 0:
                    self._need = self._decoder.send(b"")
        except BlockingIOError:
            return True
        except OSError:
            return False


class FrameWriter:
    """Sends frames on a non-blocking pipe without ever blocking: what the pipe does not take now waits
    for the event loop to report it writable (meanwhile the caller goes on working). With `coalesce_s`,
    frames sent within that window go in one write, so the reader wakes up once for all of them."""

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop, coalesce_s: float = 0.0) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self._loop = loop
        self._coalesce_s = coalesce_s
        self._unsent: deque[memoryview] = deque()
        self._waiting = False  # for the pipe to drain
        self._timer = False  # a coalesced flush is due

    def send(self, obj: Any) -> None:
        self._unsent.extend(memoryview(b).cast("B") for b in encode_frame(obj))
        if self._waiting or self._timer:
            return
        if self._coalesce_s:
            self._timer = True
            self._loop.call_later(self._coalesce_s, self._due)
        else:
            self._flush()

    def _due(self) -> None:
        self._timer = False
        if not self._waiting:
            self._flush()

    def _flush(self) -> None:
        unsent = self._unsent
        try:
            while unsent:
                k = os.writev(self.fd, list(unsent))
                while unsent and k >= len(unsent[0]):
                    k -= len(unsent.popleft())
                if unsent:
                    unsent[0] = unsent[0][k:]
        except BlockingIOError:
            if not self._waiting:
                self._waiting = True
                self._loop.add_writer(self.fd, self._flush)
            return
        if self._waiting:
            self._waiting = False
            self._loop.remove_writer(self.fd)


def write_all(fd: int, parts: list[bytes | memoryview]) -> None:
    """Write every part to a blocking fd (pipe or file) in as few writev calls as it takes."""
    views = [memoryview(p) for p in parts]
    while views:
        k = os.writev(fd, views)
        while views and k >= len(views[0]):
            k -= len(views.pop(0))
        if views:
            views[0] = views[0][k:]


def widen_pipe(fd: int) -> None:
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        with contextlib.suppress(OSError):  # e.g. a lowered /proc/sys/fs/pipe-max-size: still works
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
