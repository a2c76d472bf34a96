"""Helpers for the fetch tests: web-like images, a URL list writer, and an aiohttp server with faults.

Everything listens on 127.0.0.1 only; "connection refused" uses a closed local port."""

from __future__ import annotations

import asyncio
import io
import socket
import struct
import zlib
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from aiohttp import web
from PIL import Image, ImageDraw

from ovis_data.fetch.net import NetParams

# Deadlines short enough that stall and slow tests take about a second.
FAST_NET = NetParams(
    connect_timeout=1.0,
    read_timeout=0.5,
    total_timeout=1.5,
    retries=2,
    backoff_s=0.02,
    backoff_max_s=0.05,
    max_bytes=1_000_000,
    allow_private=True,
)


def make_image(width: int, height: int, seed: int, fmt: str = "JPEG") -> bytes:
    """Gradient + shapes + noise: decodes like a photo and compresses to a web-like size."""
    im = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(im)
    for k in range(6):
        x, y = (seed * 37 + k * 53) % width, (seed * 91 + k * 29) % height
        draw.ellipse([x, y, x + width // 4, y + height // 4], fill=((seed * 40 + k * 70) % 256, 90, 160))
    noise = Image.effect_noise((width, height), 40).convert("RGB")
    im = Image.blend(im, noise, 0.25)
    out = io.BytesIO()
    im.save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def bomb_png() -> bytes:
    """A tiny PNG whose header claims 100000 x 100000 pixels (Pillow's bomb check reads the header)."""
    png = bytearray(make_image(8, 8, 0, "PNG"))
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    png[ihdr : ihdr + 8] = struct.pack(">II", 100_000, 100_000)
    crc = zlib.crc32(bytes(png[ihdr - 4 : ihdr + 13]))
    png[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(png)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_url_list(
    path: Path, urls: list[str], image_paths: list[str], row_group_size: int = 7, **extra
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"url": urls, "image_path": image_paths, "caption": ["c"] * len(urls), **extra})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


class FaultServer:
    """Routes: /img/NAME (a stored image), and one route per fault. `hits` counts requests per path."""

    def __init__(self, images: dict[str, bytes], delay_s: float = 0.0) -> None:
        self.images = images
        self.delay_s = delay_s
        self.hits: Counter[str] = Counter()
        self.flaky_failures = 2  # 503s before /flaky/* succeeds

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count])
        r = app.router
        r.add_get("/img/{name}", self.image)
        r.add_get("/status/{code}", self.status)
        r.add_get("/flaky/{name}", self.flaky)
        r.add_get("/slow", self.slow)
        r.add_get("/stall", self.stall)
        r.add_get("/truncated", self.truncated)
        r.add_get("/html", self.html)
        r.add_get("/html-as-jpeg", self.html_as_jpeg)
        r.add_get("/big", self.big)
        r.add_get("/big-chunked", self.big_chunked)
        r.add_get("/optout", self.optout)
        r.add_get("/optout-other-agent", self.optout_other)
        r.add_get("/redirect/{n}/{name}", self.redirect)
        r.add_get("/loop/{side}", self.loop)
        r.add_get("/bomb", self.bomb)
        r.add_get("/garbage", self.garbage)
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler):
        self.hits[request.path] += 1
        return await handler(request)

    async def image(self, request: web.Request) -> web.Response:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        name = request.match_info["name"]
        if name not in self.images:
            raise web.HTTPNotFound()
        ctype = "image/png" if name.endswith(".png") else "image/jpeg"
        return web.Response(body=self.images[name], content_type=ctype)

    async def status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="no")

    async def flaky(self, request: web.Request) -> web.Response:
        if self.hits[request.path] <= self.flaky_failures:
            return web.Response(status=503, text="busy")
        return await self.image(request)

    async def _dribble(self, request: web.Request, pause: float, length: int | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        if length is not None:
            resp.content_length = length
        await resp.prepare(request)
        try:
            for _ in range(50):
                await resp.write(b"\xff")
                await asyncio.sleep(pause)
        except ConnectionError:  # the client gave up, as it should
            pass
        return resp

    async def slow(self, request: web.Request) -> web.StreamResponse:
        # Never silent long enough for the read deadline, but slower than the total deadline.
        return await self._dribble(request, 0.1, None)

    async def stall(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.content_length = 1000
        await resp.prepare(request)
        await resp.write(b"\xff\xd8")
        await asyncio.sleep(3)
        return resp

    async def truncated(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.content_length = 10_000
        await resp.prepare(request)
        await resp.write(b"\xff\xd8" + b"\x00" * 98)
        request.transport.close()  # the peer goes away mid-body
        return resp

    async def html(self, request: web.Request) -> web.Response:
        return web.Response(text="<html><body>gone</body></html>", content_type="text/html")

    async def html_as_jpeg(self, request: web.Request) -> web.Response:
        return web.Response(body=b"<!DOCTYPE html><html>hi</html>", content_type="image/jpeg")

    async def big(self, request: web.Request) -> web.Response:
        return web.Response(body=b"\xff" * 1_200_000, content_type="image/jpeg")

    async def big_chunked(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            for _ in range(60):
                await resp.write(b"\xff" * 20_000)
        except ConnectionError:  # the client gave up, as it should
            pass
        return resp

    async def optout(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.images["a.jpg"], content_type="image/jpeg", headers={"X-Robots-Tag": "noindex, noai"}
        )

    async def optout_other(self, request: web.Request) -> web.Response:
        headers = {"X-Robots-Tag": "otherbot: noai"}
        return web.Response(body=self.images["a.jpg"], content_type="image/jpeg", headers=headers)

    async def redirect(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        name = request.match_info["name"]
        target = f"/img/{name}" if n <= 1 else f"/redirect/{n - 1}/{name}"
        raise web.HTTPFound(target)

    async def loop(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop/b" if request.match_info["side"] == "a" else "/loop/a")

    async def bomb(self, request: web.Request) -> web.Response:
        return web.Response(body=bomb_png(), content_type="image/png")

    async def garbage(self, request: web.Request) -> web.Response:
        return web.Response(
            body=b"\x00\x01binary-but-not-an-image" * 20, content_type="application/octet-stream"
        )
