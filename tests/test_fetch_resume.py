"""Never lose work: SIGKILL mid-run then resume, retry of transient failures only, parts, watchdog."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_fetch_support import FAST_NET, FaultServer, make_image, write_url_list

from ovis_data.fetch import FetchOptions, ImageParams, fetch_url_list, open_url_list, serve_app
from ovis_data.fetch.writer import TAR_MTIME, tar_header
from ovis_data.imagestore import SHARD_INDEX_DIR, ImageStore, build_index, load_index, read_shard_index

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 60
IMAGES = {f"{i:03d}.jpg": make_image(200 + 7 * i, 150 + 5 * i, i) for i in range(N_IMAGES)}


def url_list_for(tmp_path: Path, base: str, names: list[str], route: str = "img") -> Path:
    urls = [f"{base}/{route}/{n}" for n in names]
    return write_url_list(tmp_path / "urls.parquet", urls, [f"sub/{n}" for n in names], row_group_size=16)


def store_contents(image_dir: Path) -> dict[str, bytes]:
    store = ImageStore(image_dir)
    if store.layout == "shards":
        paths = load_index(image_dir).column("image_path").to_pylist()
    else:
        paths = [p for p in store.listing().column("image_path").to_pylist() if not p.startswith(".fetch")]
    return {p: store.read_bytes(p) for p in paths}


def leftovers(image_dir: Path) -> list[str]:
    """Temporary or partial files visible anywhere under image_dir."""
    files = [p.relative_to(image_dir).as_posix() for p in image_dir.rglob("*") if p.is_file()]
    return [f for f in files if ".tmp" in f or f.startswith(".fetch/tmp/")]


CHILD = """
import sys
from ovis_data.fetch import FetchOptions, NetParams, fetch_url_list, open_url_list
url_list, image_dir, layout = sys.argv[1:4]
net = NetParams(allow_private=True, concurrency=4, per_host=4)
opts = FetchOptions(layout=layout, net=net, shard_size=6, processes=1, shards_in_flight=1)
fetch_url_list(open_url_list(url_list, "url", "image_path"), __import__("pathlib").Path(image_dir), opts)
"""


@pytest.mark.parametrize("layout", ["files", "shards"])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path, layout: str) -> None:
    server = FaultServer(IMAGES, delay_s=0.04)
    opts = FetchOptions(
        layout=layout, net=replace(FAST_NET, concurrency=4, per_host=4), shard_size=6, processes=1
    )
    with serve_app(server.app()) as base:
        url_list = url_list_for(tmp_path, base, sorted(IMAGES))
        ul = open_url_list(url_list, "url", "image_path")
        fetch_url_list(ul, tmp_path / "reference", opts)

        killed = tmp_path / "killed"
        marker_dir = killed if layout == "shards" else killed / ".fetch"
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(url_list), str(killed), layout], cwd=REPO)
        deadline = time.monotonic() + 60
        while len(list(marker_dir.glob("*_stats.json"))) < 3 and time.monotonic() < deadline:
            assert child.poll() is None, "the child run ended before the kill"
            time.sleep(0.005)
        time.sleep(0.05)  # into the middle of the next shard
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        finished = sorted(p.name[:5] for p in marker_dir.glob("*_stats.json"))
        assert 3 <= len(finished) < 10, "the kill should land mid-run"

        # What a killed run leaves in view is whole: every image decodes, every finished tar reads.
        if layout == "files":
            for p in (killed / "sub").glob("*.jpg"):
                Image.open(p).load()
        else:
            for name in finished:
                with tarfile.open(killed / f"{name}.tar") as tf:
                    assert len(tf.getnames()) == 12
        hits_before = server.hits.copy()
        fetch_url_list(ul, killed, opts)

    assert store_contents(killed) == store_contents(tmp_path / "reference")
    assert len(store_contents(killed)) == N_IMAGES
    assert leftovers(killed) == []
    # Rows of shards finished before the kill were not downloaded again.
    names = sorted(IMAGES)
    for shard in finished:
        for n in names[int(shard) * 6 : int(shard) * 6 + 6]:
            assert server.hits[f"/img/{n}"] == hits_before[f"/img/{n}"]


@pytest.mark.parametrize("layout", ["files", "shards"])
def test_retry_failed_reattempts_transient_failures_only(tmp_path: Path, layout: str) -> None:
    server = FaultServer({**IMAGES, "flaky.jpg": make_image(300, 200, 99)})
    server.flaky_failures = 10  # more than the retries of one run
    image_dir = tmp_path / "d"
    with serve_app(server.app()) as base:
        urls = [
            f"{base}/img/000.jpg",
            f"{base}/flaky/flaky.jpg",
            f"{base}/img/missing.jpg",
            f"{base}/img/001.jpg",
        ]
        url_list = write_url_list(tmp_path / "u.parquet", urls, ["a.jpg", "flaky.jpg", "gone.jpg", "b.jpg"])
        ul = open_url_list(url_list, "url", "image_path")
        opts = FetchOptions(layout=layout, net=FAST_NET, shard_size=2, processes=1)
        first = fetch_url_list(ul, image_dir, opts)
        assert first.success == 2 and first.failed == {"http_5xx": 1, "http_404": 1}

        again = fetch_url_list(ul, image_dir, opts)  # plain re-run: everything finished, nothing fetched
        assert again.this_run["attempted"] == 0

        server.flaky_failures = 0
        hits = server.hits.copy()
        retried = fetch_url_list(ul, image_dir, replace(opts, retry_failed=True))
    assert retried.this_run == {"attempted": 1, "success": 1, "failed": 0}
    assert retried.success == 3 and retried.failed == {"http_404": 1}
    assert server.hits["/img/missing.jpg"] == hits["/img/missing.jpg"]  # a 404 is final
    assert server.hits["/img/000.jpg"] == hits["/img/000.jpg"]
    assert sorted(store_contents(image_dir)) == ["a.jpg", "b.jpg", "flaky.jpg"]
    status_dir = image_dir if layout == "shards" else image_dir / ".fetch"
    rows = pq.read_table(status_dir / "00000.parquet").to_pylist()
    assert [(r["image_path"], r["status"]) for r in rows] == [("a.jpg", "success"), ("flaky.jpg", "success")]


def test_parts_split_the_work_and_share_one_store(tmp_path: Path) -> None:
    server = FaultServer(IMAGES)
    image_dir = tmp_path / "d"
    with serve_app(server.app()) as base:
        ul = open_url_list(url_list_for(tmp_path, base, sorted(IMAGES)[:20]), "url", "image_path")
        for i in (0, 1):
            opts = FetchOptions(layout="shards", net=FAST_NET, shard_size=3, processes=1, part=(i, 2))
            report = fetch_url_list(ul, image_dir, opts)
            assert report.total == (9 if i == 0 else 11)
    assert len(store_contents(image_dir)) == 20
    assert sum(server.hits.values()) == 20  # each URL once


def test_max_side_zero_keeps_original_bytes(tmp_path: Path) -> None:
    png = make_image(900, 700, 7, "PNG")
    server = FaultServer({"x.jpg": IMAGES["010.jpg"], "y.png": png})
    with serve_app(server.app()) as base:
        url_list = url_list_for(tmp_path, base, ["x.jpg", "y.png"])
        opts = FetchOptions(layout="shards", net=FAST_NET, image=ImageParams(max_side=0), processes=1)
        fetch_url_list(open_url_list(url_list, "url", "image_path"), tmp_path / "d", opts)
    got = store_contents(tmp_path / "d")
    assert got == {"sub/x.jpg": IMAGES["010.jpg"], "sub/y.png": png}
    with tarfile.open(tmp_path / "d" / "00000.tar") as tf:
        assert sorted(n.rsplit(".", 1)[1] for n in tf.getnames()) == ["jpg", "json", "json", "png"]


def test_watchdog_ends_stuck_rows(tmp_path: Path) -> None:
    server = FaultServer(IMAGES)
    with serve_app(server.app()) as base:
        urls = [f"{base}/slow", f"{base}/img/000.jpg"]
        url_list = write_url_list(tmp_path / "u.parquet", urls, ["slow.jpg", "ok.jpg"])
        net = replace(FAST_NET, read_timeout=30, total_timeout=30, retries=0)
        for opts in (
            FetchOptions(net=net, processes=1, row_deadline_s=0.5),  # one row overruns its deadline
            FetchOptions(net=net, processes=1, stall_s=0.6),  # nothing finishes for a while
        ):
            image_dir = tmp_path / f"d{opts.stall_s}"
            report = fetch_url_list(open_url_list(url_list, "url", "image_path"), image_dir, opts)
            assert report.failed == {"watchdog": 1} and report.success == 1


def test_hash_verified_when_the_source_gives_one(tmp_path: Path) -> None:
    import hashlib

    server = FaultServer(IMAGES)
    with serve_app(server.app()) as base:
        urls = [f"{base}/img/000.jpg", f"{base}/img/001.jpg"]
        good = hashlib.sha256(IMAGES["000.jpg"]).hexdigest()
        path = write_url_list(tmp_path / "u.parquet", urls, ["a.jpg", "b.jpg"], sha=[good, "0" * 64])
        opts = FetchOptions(net=FAST_NET, processes=1)
        report = fetch_url_list(open_url_list(path, "url", "image_path", "sha"), tmp_path / "d", opts)
    assert report.success == 1 and report.failed == {"hash_mismatch": 1}
    decoded = Image.open(io.BytesIO((tmp_path / "d" / "a.jpg").read_bytes()))
    assert decoded.size == (200, 150)


def test_shard_index_saved_by_fetch_equals_a_scan_of_the_tars(tmp_path: Path) -> None:
    """The shards layout's index comes from the offsets the writer knew; it must equal what a scan of
    the tars finds, and a tar changed since its part was saved must be scanned again."""
    names = sorted(IMAGES)[:20]
    image_dir = tmp_path / "d"
    with serve_app(FaultServer(IMAGES).app()) as base:
        ul = open_url_list(url_list_for(tmp_path, base, names), "url", "image_path")
        fetch_url_list(ul, image_dir, FetchOptions(layout="shards", net=FAST_NET, shard_size=8, processes=1))
    from_writer = load_index(image_dir)
    parts = sorted(p.name for p in (image_dir / SHARD_INDEX_DIR).iterdir())
    assert parts == ["00000.parquet", "00001.parquet", "00002.parquet"]
    shutil.rmtree(image_dir / SHARD_INDEX_DIR)
    (image_dir / "index.parquet").unlink()
    scanned = build_index(image_dir)  # scans every tar, saving the parts again
    assert scanned.equals(from_writer) and len(from_writer) == 20
    assert sorted(p.name for p in (image_dir / SHARD_INDEX_DIR).iterdir()) == parts
    with tarfile.open(image_dir / "00001.tar") as tf:  # offsets point at the members' bytes
        for row in from_writer.to_pylist():
            if row["tar"] == "00001.tar":
                member = tf.getmember(_member_at(tf, row["offset"]))
                assert tf.extractfile(member).read() == ImageStore(image_dir).read_bytes(row["image_path"])

    # A tar rewritten after its part was saved (here: a member dropped) is scanned, not trusted.
    rewritten = tmp_path / "rewritten.tar"
    with tarfile.open(image_dir / "00000.tar") as old, tarfile.open(rewritten, "w") as new:
        for m in old.getmembers()[2:]:
            new.addfile(m, old.extractfile(m))
    os.replace(rewritten, image_dir / "00000.tar")
    assert read_shard_index(image_dir, "00000") is None
    assert len(build_index(image_dir)) == 19


def _member_at(tf: tarfile.TarFile, offset: int) -> str:
    return next(m.name for m in tf.getmembers() if m.offset_data == offset)


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("0000000001.jpg", 12345),
        ("k.json", 0),
        ("x" * 99, 8**11 - 1),
        ("é.jpg", 5),
        ("y" * 150, 10),
        ("z", 8**11),
    ],
)
def test_template_tar_header_equals_tarfile(name: str, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, 0o644
    assert tar_header(name, size) == info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
