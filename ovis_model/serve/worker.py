"""One generation at a time per model: a single worker thread takes jobs in arrival order from a bounded
queue. The web page and the API share it, so a model is never asked two things at once (its KV cache and
torch's RNG are per process), and a crowd gets a quick 503 instead of an ever longer wait."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..chat import ChatResult
from ..runner import OvisRunner, Prepared


class QueueFull(RuntimeError):
    """Every place in the queue is taken: the caller answers 503 (retry later)."""


@dataclass
class Job:
    """A submitted generation: `future` gives the ChatResult (None when cancelled before it started);
    setting `cancel` stops it at its next token."""

    future: Future
    cancel: threading.Event = field(default_factory=threading.Event)


class GenerationQueue:
    """Runs `runner.generate` for one conversation at a time; at most `max_waiting` wait behind it."""

    def __init__(self, runner: OvisRunner, max_waiting: int):
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, not {max_waiting}")
        self.runner = runner
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._admitted = 0  # running + waiting
        self._running = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ovis-generate")

    def submit(
        self, prepared: Prepared, on_text: Callable[[str], None] | None = None, **generation: Any
    ) -> Job:
        """Queue one generation (`generation`: the runner's settings); raises QueueFull when full."""
        with self._lock:
            if self._admitted >= self.max_waiting + 1:
                raise QueueFull(
                    f"the model is busy: 1 generation running and {self.max_waiting} waiting; retry later"
                )
            self._admitted += 1
        cancel = threading.Event()

        def work() -> ChatResult | None:
            if cancel.is_set():  # its client left while it waited
                return None
            with self._lock:
                self._running = True
            try:
                return self.runner.generate([prepared], on_text=on_text, cancel=cancel, **generation)[0]
            finally:
                with self._lock:
                    self._running = False

        future = self._pool.submit(work)
        future.add_done_callback(self._done)
        return Job(future, cancel)

    def _done(self, _: Future) -> None:
        with self._lock:
            self._admitted -= 1

    def status(self) -> dict[str, int]:
        with self._lock:
            running = int(self._running)
            return {"running": running, "waiting": self._admitted - running, "max_waiting": self.max_waiting}

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
