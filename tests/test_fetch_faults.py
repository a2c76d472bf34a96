"""Every injected fault ends in its own failure class, the run completes, and nothing hangs."""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from aiohttp import web
from PIL import Image
from test_fetch_support import FAST_NET, FaultServer, closed_port, make_image, write_url_list
from yarl import URL

from ovis_data.fetch import FetchOptions, fetch_url_list, open_url_list, serve_app
from ovis_data.fetch import net as net_module
from ovis_data.fetch.net import Downloader, opted_out
from ovis_data.fetch.safety import check_url
from ovis_data.imagestore import ImageStore

IMAGES = {
    "a.jpg": make_image(640, 480, 1),
    "big.jpg": make_image(1600, 900, 2),
    "tall.png": make_image(300, 700, 3, "PNG"),
    "small.jpg": make_image(40, 30, 4),
    "flaky.jpg": make_image(320, 200, 5),
    "flaky-too-long.jpg": make_image(320, 200, 6),
}


def fault_cases(base: str) -> dict[str, tuple[str, str | None]]:
    """image_path -> (url, expected failure class or None for success)."""
    return {
        "ok/a.jpg": (f"{base}/img/a.jpg", None),
        "ok/big.jpg": (f"{base}/img/big.jpg", None),
        "ok/tall.png": (f"{base}/img/tall.png", None),
        "ok/small.jpg": (f"{base}/img/small.jpg", None),
        "ok/flaky.jpg": (f"{base}/flaky/flaky.jpg", None),
        "ok/redirected.jpg": (f"{base}/redirect/3/a.jpg", None),
        "ok/optout-other.jpg": (f"{base}/optout-other-agent", None),
        "bad/404.jpg": (f"{base}/img/missing.jpg", "http_404"),
        "bad/500.jpg": (f"{base}/status/500", "http_5xx"),
        "bad/403.jpg": (f"{base}/status/403", "http_4xx"),
        "bad/429.jpg": (f"{base}/status/429", "http_429"),
        "bad/slow.jpg": (f"{base}/slow", "timeout"),
        "bad/stall.jpg": (f"{base}/stall", "timeout"),
        "bad/truncated.jpg": (f"{base}/truncated", "truncated"),
        "bad/html.jpg": (f"{base}/html", "not_image"),
        "bad/html-as-jpeg.jpg": (f"{base}/html-as-jpeg", "not_image"),
        "bad/garbage.jpg": (f"{base}/garbage", "decode_error"),
        "bad/big.jpg": (f"{base}/big", "too_large"),
        "bad/big-chunked.jpg": (f"{base}/big-chunked", "too_large"),
        "bad/optout.jpg": (f"{base}/optout", "opted_out"),
        "bad/too-many.jpg": (f"{base}/redirect/9/a.jpg", "too_many_redirects"),
        "bad/loop.jpg": (f"{base}/loop/a", "redirect_loop"),
        "bad/refused.jpg": (f"http://127.0.0.1:{closed_port()}/x.jpg", "connection_refused"),
        "bad/bomb.png": (f"{base}/bomb", "decompression_bomb"),
        "bad/ftp.jpg": ("ftp://127.0.0.1/x.jpg", "unsupported_scheme"),
        "bad/file.jpg": ("file:///etc/passwd", "unsupported_scheme"),
        "bad/empty-url.jpg": ("", "missing_url"),
        "../escape.jpg": (f"{base}/img/a.jpg", "bad_path"),
    }


def statuses(image_dir: Path, layout: str) -> dict[str, str | None]:
    status_dir = image_dir if layout == "shards" else image_dir / ".fetch"
    out = {}
    for p in sorted(status_dir.glob("[0-9]*.parquet")):
        for r in pq.read_table(p).to_pylist():
            out[r["image_path"]] = r["error_class"]
    return out


@pytest.mark.parametrize("layout", ["files", "shards"])
def test_every_fault_ends_in_its_class(tmp_path: Path, layout: str) -> None:
    server = FaultServer(IMAGES)
    with serve_app(server.app()) as base:
        cases = fault_cases(base)
        url_list = write_url_list(
            tmp_path / "urls.parquet", [u for u, _ in cases.values()], list(cases), row_group_size=5
        )
        image_dir = tmp_path / "images" / "d"
        opts = FetchOptions(layout=layout, net=FAST_NET, shard_size=8, processes=2)
        report = fetch_url_list(open_url_list(url_list, "url", "image_path"), image_dir, opts, label="faults")

    got = statuses(image_dir, layout)
    assert got == {path: cls for path, (_, cls) in cases.items()}
    expected_failed: dict[str, int] = {}
    for _, cls in cases.values():
        if cls:
            expected_failed[cls] = expected_failed.get(cls, 0) + 1
    assert report.failed == expected_failed
    assert report.total == len(cases) and report.success == 7
    assert server.hits["/flaky/flaky.jpg"] == 3  # two 503s, then success
    assert server.hits["/img/missing.jpg"] == 1  # a 404 is never retried
    assert server.hits["/status/500"] == 3  # a 5xx is: 1 + FAST_NET.retries

    store = ImageStore(image_dir)
    assert store.layout == layout
    for path, (_, cls) in cases.items():
        if cls is None:
            im = Image.open(io.BytesIO(store.read_bytes(path)))
            assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) <= 512
    big = Image.open(io.BytesIO(store.read_bytes("ok/big.jpg")))
    assert big.size == (512, 288)  # aspect kept, longer side capped
    small = Image.open(io.BytesIO(store.read_bytes("ok/small.jpg")))
    assert small.size == (40, 30)  # never upscaled
    assert not (tmp_path / "escape.jpg").exists()


def test_private_addresses_refused_without_the_flag(tmp_path: Path) -> None:
    server = FaultServer(IMAGES)
    with serve_app(server.app()) as base:
        port = base.rsplit(":", 1)[1]
        urls = [f"{base}/img/a.jpg", f"http://localhost:{port}/img/a.jpg", f"http://[::1]:{port}/img/a.jpg"]
        paths = ["loopback.jpg", "by-name.jpg", "v6.jpg"]
        url_list = write_url_list(tmp_path / "urls.parquet", urls, paths)
        net = replace(FAST_NET, allow_private=False)
        opts = FetchOptions(net=net, shard_size=10, processes=1)
        report = fetch_url_list(open_url_list(url_list, "url", "image_path"), tmp_path / "d", opts)
    assert report.failed == {"private_address": 3}
    assert server.hits["/img/a.jpg"] == 0  # refused before any connection


def test_opt_out_header_parsing() -> None:
    assert opted_out(["noai"]) and opted_out(["noindex, nofollow"]) and opted_out(["NoImageAI"])
    assert opted_out(["ovis-data: noimageindex"])
    assert not opted_out(["otherbot: noai"]) and not opted_out(["nofollow"]) and not opted_out([])


PRIVATE_SPELLINGS = [
    "http://2130706433/x.jpg",  # decimal
    "http://0x7F000001/x.jpg",  # one hex number
    "http://127.1/x.jpg",  # short
    "http://0177.0.0.1/x.jpg",  # octal
    "http://0x7f.1/x.jpg",  # hex, short
    "http://127.0.0.1./x.jpg",  # trailing dot
    "http://%31%32%37.0.0.1/x.jpg",  # percent-encoded
    "http://10.1/x.jpg",  # a private network, short
    "http://0/x.jpg",
    "http://[::ffff:127.0.0.1]/x.jpg",  # IPv4-mapped
    "http://[::127.0.0.1]/x.jpg",  # IPv4-compatible
    "http://[64:ff9b::7f00:1]/x.jpg",  # NAT64
    "http://[64:ff9b::a00:1]/x.jpg",  # NAT64 of 10.0.0.1
    "http://[2002:7f00:1::]/x.jpg",  # 6to4
    "http://[fe80::1%25eth0]/x.jpg",  # link-local with a zone
]


@pytest.mark.parametrize("url", PRIVATE_SPELLINGS)
def test_every_literal_spelling_of_a_private_address_is_refused(url: str) -> None:
    assert check_url(URL(url), allow_private=False) == "private_address"
    assert check_url(URL(url), allow_private=True) is None


@pytest.mark.parametrize(
    "url", ["http://8.8.8.8/x", "http://[::ffff:8.8.8.8]/x", "http://[64:ff9b::808:808]/x", "http://a.com/x"]
)
def test_public_addresses_and_names_pass_the_literal_check(url: str) -> None:
    assert check_url(URL(url), allow_private=False) is None


def test_private_spellings_are_refused_on_every_redirect_hop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test server is on 127.0.0.1, which the guard would refuse: only that exact spelling is let
    through here, so each redirect to another spelling must be refused before connecting."""
    real = net_module.check_url
    monkeypatch.setattr(
        net_module, "check_url", lambda url, allow: None if url.raw_host == "127.0.0.1" else real(url, allow)
    )
    server = FaultServer(IMAGES)
    app = server.app()

    async def to(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["u"])

    app.router.add_get("/to", to)
    targets = [u.replace("/x.jpg", "/img/a.jpg") for u in PRIVATE_SPELLINGS]

    async def run(base: str) -> list[str]:
        port = base.rsplit(":", 1)[1]
        net = replace(FAST_NET, allow_private=False)
        async with Downloader(net) as dl:
            ok = await dl.fetch(f"{base}/redirect/2/a.jpg")
            assert ok.status == "success", ok
            out = []
            for t in targets:
                hop = URL(t).with_port(int(port))  # where the server is, were it not refused
                out.append((await dl.fetch(str(URL(f"{base}/to").with_query(u=str(hop))))).status)
            return out

    with serve_app(app) as base:
        statuses = asyncio.run(run(base))
    assert statuses == ["private_address"] * len(targets)
    assert server.hits["/img/a.jpg"] == 1  # only the allowed hop ever reached the image
