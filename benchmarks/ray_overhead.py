"""What `fetch --ray` costs over the local engine, on one machine: the same URL list (fetch_vs_img2dataset's
web-like images and ~2% dead URLs, from its local aiohttp server) fetched by the local engine and by a
one-node Ray cluster started here (every core), shards layout, same options.

    python benchmarks/ray_overhead.py [--n 2000] [--shard-size 250]

Prints both rates, the overhead, the per-shard (per-task) overhead in ms, the round trip of an empty Ray
task, and a projection for coyo-10m (10M rows, 1,000 shards of 10,000) on N nodes from the measured
per-core rate. Two Ray worker nodes sharing this machine's cores would measure nothing about scaling,
so the projection assumes nodes that each have the cores measured here, and a network like the server's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fetch_vs_img2dataset import BENCH, MAX_SIDE, QUALITY, corpus, start_server, url_list  # noqa: E402

from ovis_data.fetch import FetchOptions, ImageParams, NetParams, fetch_url_list, open_url_list  # noqa: E402
from ovis_data.fetch.frames import default_processes  # noqa: E402


def run(urls: Path, out: Path, shard_size: int, ray: str | None) -> tuple[float, int, int]:
    shutil.rmtree(out, ignore_errors=True)
    opts = FetchOptions(
        layout="shards",
        image=ImageParams(MAX_SIDE, QUALITY),
        net=NetParams(allow_private=True, concurrency=64, per_host=64),
        shard_size=shard_size,
        ray=ray,
    )
    start = time.perf_counter()
    report = fetch_url_list(open_url_list(urls, "url", "image_path"), out, opts, label="bench")
    return time.perf_counter() - start, report.success, report.shards["total"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=250)
    args = ap.parse_args()
    import ray

    folder = corpus(args.n)
    server, base = start_server(folder)
    work = BENCH / "ray_overhead"
    work.mkdir(parents=True, exist_ok=True)
    urls = url_list(folder, base, work)
    cores = default_processes()
    try:
        run(urls, work / "warm", args.shard_size, None)  # page cache, server warm
        local_s, local_ok, shards = run(urls, work / "local", args.shard_size, None)
        t0 = time.perf_counter()
        ray.init(num_cpus=cores, log_to_driver=False, include_dashboard=False)
        ray_start_s = time.perf_counter() - t0
        noop = ray.remote(lambda: None)
        ray.get([noop.remote() for _ in range(20)])
        t0 = time.perf_counter()
        for _ in range(50):
            ray.get(noop.remote())
        roundtrip_ms = (time.perf_counter() - t0) / 50 * 1000
        ray_s, ray_ok, _ = run(urls, work / "ray", args.shard_size, "auto")
    finally:
        server.kill()
        ray.shutdown()
    assert ray_ok == local_ok
    local_rate, ray_rate = local_ok / local_s, ray_ok / ray_s
    per_shard_ms = (ray_s - local_s) / shards * 1000
    print(f"{args.n} images (+dead URLs), {shards} shards of {args.shard_size}, {cores} cores")
    print(f"local engine: {local_s:.1f} s, {local_rate:.0f} img/s")
    overhead = ray_s / local_s - 1
    print(f"1-node Ray:   {ray_s:.1f} s, {ray_rate:.0f} img/s ({overhead:+.1%}); start {ray_start_s:.1f} s")
    print(
        f"per-task overhead: {per_shard_ms:.0f} ms per shard; empty Ray task round trip {roundtrip_ms:.2f} ms"
    )
    per_node = ray_rate  # images/s of one node with these cores
    shard_s = 10_000 / per_node
    for nodes in (1, 8, 32, 128):
        waves = -(-1000 // nodes)  # 1,000 shards of 10,000 rows, one task per node at a time
        hours = waves * (shard_s + per_shard_ms / 1000) / 3600
        print(f"coyo-10m, {nodes:>3} nodes of {cores} cores: ~{hours:.2f} h ({waves} x {shard_s:.0f} s)")


if __name__ == "__main__":
    main()
