"""A local HTTP server in a background thread: the demo, tests and benchmarks fetch from it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aiohttp import web


@contextmanager
def serve_app(
    app: web.Application, host: str = "127.0.0.1", port: int = 0, reuse_port: bool = False
) -> Iterator[str]:
    """Run an aiohttp app on host:port (0: any free port) in a daemon thread; yields its base URL.

    reuse_port: other processes may listen on the same port (SO_REUSEPORT; the kernel spreads connections
    over them): servers of the same files in several processes answer at one URL while any one of them
    is up."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state: dict[str, object] = {}

    async def start() -> None:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
        await site.start()
        state["runner"] = runner
        state["port"] = runner.addresses[0][1]

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as e:  # surface bind errors in the caller's thread
            state["error"] = e
            started.set()
            return
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=main, name="ovis-serve", daemon=True)
    thread.start()
    started.wait()
    if "error" in state:
        raise state["error"]  # type: ignore[misc]
    try:
        yield f"http://{host}:{state['port']}"
    finally:
        runner = state["runner"]
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)  # type: ignore[attr-defined]
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def directory_app(path: Path) -> web.Application:
    app = web.Application()
    app.router.add_static("/", Path(path), follow_symlinks=False)
    return app


@contextmanager
def serve_directory(
    path: str | Path, host: str = "127.0.0.1", port: int = 0, reuse_port: bool = False
) -> Iterator[str]:
    """Serve the files under `path` read-only over HTTP; yields the base URL (no trailing slash).

    Fetch from it with `FetchOptions(net=NetParams(allow_private=True))`: it listens on loopback."""
    with serve_app(directory_app(Path(path)), host, port, reuse_port) as base_url:
        yield base_url
