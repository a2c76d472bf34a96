"""What `fetch --ray` and `pack --ray` cost over the local engine, on one machine.

    python benchmarks/ray_overhead.py [--n 2000] [--shard-size 250] [--pack-n 1000] [--packs-per-shard 50]
    python benchmarks/ray_overhead.py --skip-fetch      # pack only (~2-4 min on 2 busy cores)

fetch: the same URL list (fetch_vs_img2dataset's web-like images and ~2% dead URLs, from its local aiohttp
server) fetched by the local engine and by a one-node Ray cluster started here (every core), shards
layout, same options. Prints both rates, the overhead, the per-shard (per-task) overhead in ms, the round
trip of an empty Ray task, and a projection for coyo-10m (10M rows, 1,000 shards of 10,000) on N nodes
from the measured per-core rate. Two Ray worker nodes sharing this machine's cores would measure nothing
about scaling, so the projection assumes nodes that each have the cores measured here, and a network
like the server's.

pack: stage 1 (coyo-10m captions) of --pack-n samples whose images are the first --pack-n files of the
same web-like corpus (hard links, files layout; validated once, not timed), packed by `pack_stage` with
local processes (every core) and with `ray="auto"` on a one-node cluster started for that run (every
core), same inputs and seed: one untimed local run (page cache), then local / Ray alternated `--repeats`
times, the best of each kept. The cluster's start is timed apart (`ovis-data pack --ray` joins a running
cluster); it includes the one idle worker per CPU Ray starts with the first driver, so the Ray figure
leaves out the start of its worker processes while the local one includes its pool's. Every run's shards
and manifest must be byte-identical to the first local run's (asserted). Prints both times (and pack's
phases), the ratio and the overhead per Ray task (tokenization units + shard tasks).

Every timed run records the 1-minute load average before it, the share of the CPUs other processes took
during it (as loader_throughput.py measures it: the machine's busy time less this script's process tree,
Ray's processes and fetch's local image server included) and the CPU seconds the tree spent: on cores
shared with other jobs, more processes win a larger share of them, so the wall-time ratio moves with the
load; the CPU seconds are the cost of the work itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow.parquet as pq  # noqa: E402
from cpu_load import cpu_seconds  # noqa: E402
from fetch_vs_img2dataset import BENCH, MAX_SIDE, QUALITY, corpus, start_server, url_list  # noqa: E402
from pack_corpus import captions, qwen_path  # noqa: E402

from ovis_data.fetch import FetchOptions, ImageParams, NetParams, fetch_url_list, open_url_list  # noqa: E402
from ovis_data.fetch.frames import default_processes  # noqa: E402
from ovis_data.validate.catalog import catalog_path  # noqa: E402


class Load:
    """The 1-minute load average before a run, the CPU share other processes took during it and the CPU
    seconds this script's tree spent (the work's cost, whatever share of the cores the others left it)."""

    def __enter__(self) -> Load:
        self.load1 = os.getloadavg()[0]
        self.a, self.t0 = cpu_seconds(), time.perf_counter()
        self.share = self.cpu_s = None
        return self

    def __exit__(self, *exc: object) -> None:
        b, wall = cpu_seconds(), time.perf_counter() - self.t0
        if self.a is not None and b is not None:
            self.cpu_s = b[1] - self.a[1]
            self.share = max(0.0, (b[0] - b[1] - self.a[0] + self.a[1]) / wall / (os.cpu_count() or 1))

    def __str__(self) -> str:
        if self.share is None or self.cpu_s is None:
            return f"others' CPU share n/a (load {self.load1:.1f} before)"
        return (
            f"{self.cpu_s:.1f} CPU-s; others used {self.share:.0%} of the CPUs (load {self.load1:.1f} before)"
        )


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


def fetch_part(args: argparse.Namespace, cores: int) -> None:
    import ray

    folder = corpus(args.n)
    server, base = start_server(folder)
    work = BENCH / "ray_overhead"
    work.mkdir(parents=True, exist_ok=True)
    urls = url_list(folder, base, work)
    try:
        run(urls, work / "warm", args.shard_size, None)  # page cache, server warm
        with Load() as local_load:
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
        with Load() as ray_load:
            ray_s, ray_ok, _ = run(urls, work / "ray", args.shard_size, "auto")
    finally:
        server.kill()
        ray.shutdown()
    assert ray_ok == local_ok
    local_rate, ray_rate = local_ok / local_s, ray_ok / ray_s
    per_shard_ms = (ray_s - local_s) / shards * 1000
    print(f"fetch: {args.n} images (+dead URLs), {shards} shards of {args.shard_size}, {cores} cores")
    print(f"local engine: {local_s:.1f} s, {local_rate:.0f} img/s; {local_load}")
    overhead = ray_s / local_s - 1
    print(
        f"1-node Ray:   {ray_s:.1f} s, {ray_rate:.0f} img/s ({overhead:+.1%}); start {ray_start_s:.1f} s; "
        f"{ray_load}"
    )
    print(
        f"per-task overhead: {per_shard_ms:.0f} ms per shard; empty Ray task round trip {roundtrip_ms:.2f} ms"
    )
    per_node = ray_rate  # images/s of one node with these cores
    shard_s = 10_000 / per_node
    for nodes in (1, 8, 32, 128):
        waves = -(-1000 // nodes)  # 1,000 shards of 10,000 rows, one task per node at a time
        hours = waves * (shard_s + per_shard_ms / 1000) / 3600
        print(f"coyo-10m, {nodes:>3} nodes of {cores} cores: ~{hours:.2f} h ({waves} x {shard_s:.0f} s)")


def pack_root(n: int) -> Path:
    """A data root with coyo-10m's meta file (n captions) and its images (the first n files of the fetch
    corpus, hard-linked), validated once; reused when built for the same n."""
    import pyarrow as pa

    from ovis_data.registry import load_registry
    from ovis_data.validate.dataset import validate_dataset

    root = BENCH / "ray_overhead" / f"pack_root_n{n}"
    if (root / "done").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    spec = load_registry()["coyo-10m"]
    images = sorted(p for p in corpus(max(n, 2000)).iterdir() if p.suffix in (".jpg", ".png"))[:n]
    if len(images) < n:
        raise SystemExit(f"the fetch corpus has {len(images)} images, fewer than --pack-n {n}")
    image_dir = spec.image_path(root)
    image_dir.mkdir(parents=True)
    for p in images:
        try:
            os.link(p, image_dir / p.name)
        except OSError:  # another file system
            shutil.copyfile(p, image_dir / p.name)
    spec.meta_path(root).parent.mkdir(parents=True)
    names = [p.name for p in images]
    table = {
        "id": pa.array(range(n), pa.int64()),
        "image_url": [f"http://images.invalid/{x}" for x in names],
        "image_path": names,
        "caption": captions(n),
    }
    pq.write_table(pa.table(table), spec.meta_path(root))
    result = validate_dataset(spec, root)
    if result.error:
        raise SystemExit(f"coyo-10m: {result.error}")
    (root / "done").write_text("ok")
    return root


class Phases:
    """pack's progress calls, timed: setup (recipe, catalog, tokenizer) until the first tokenization
    call, tokenize + plan until the first write call, write until the end."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.first: dict[str, float] = {}
        self.end = 0.0  # set when pack_stage returned

    def __call__(self, label: str, done: int, total: int) -> None:
        self.first.setdefault(label, time.perf_counter())

    def __str__(self) -> str:
        end = self.end or time.perf_counter()
        tok, write = self.first.get("tokenize", self.t0), self.first.get("write", end)
        return f"setup {tok - self.t0:.1f} s, tokenize + plan {write - tok:.1f} s, write {end - write:.1f} s"


def pack_once(
    root: Path, out: Path, packs_per_shard: int, cores: int, ray: bool
) -> tuple[float, float, Load, Phases, dict]:
    """One pack of stage 1 into out (emptied first): seconds, Ray start seconds, the load during the pack
    (the cluster's start and shutdown aside), its phases, manifest."""
    import ray as ray_mod

    from ovis_data.pack.stage import pack_stage

    shutil.rmtree(out, ignore_errors=True)
    start_s = 0.0
    if ray:  # a fresh one-node cluster per run: every `pack --ray` is a new job with new workers
        t0 = time.perf_counter()
        ray_mod.init(num_cpus=cores, log_to_driver=False, include_dashboard=False)
        start_s = time.perf_counter() - t0
    try:
        with Load() as load:
            phases = Phases()
            manifest = pack_stage(
                1,
                root,
                qwen_path(),
                out,
                processes=cores,
                packs_per_shard=packs_per_shard,
                ray="auto" if ray else None,
                progress=phases,
            )
            phases.end = time.perf_counter()
    finally:
        if ray:
            ray_mod.shutdown()
    return phases.end - phases.t0, start_s, load, phases, manifest


def stage_files(out: Path) -> dict[str, bytes]:
    """Every file of a packed stage (shards, manifest), the work folder aside."""
    stage = out / "stage1"
    return {
        str(p.relative_to(stage)): p.read_bytes()
        for p in sorted(stage.rglob("*"))
        if p.is_file() and ".work" not in p.relative_to(stage).parts
    }


def pack_part(args: argparse.Namespace, cores: int) -> None:
    root = pack_root(args.pack_n)
    work = BENCH / "ray_overhead"
    want: dict[str, bytes] | None = None
    runs: dict[str, list[tuple[float, float, Load]]] = {"local": [], "ray": []}
    pack_once(root, work / "pack_warm", args.packs_per_shard, cores, False)  # page cache, imports
    manifest: dict = {}
    for i in range(args.repeats):
        for kind in ("local", "ray"):
            ray_run = kind == "ray"
            took, start_s, load, phases, manifest = pack_once(
                root, work / f"pack_{kind}", args.packs_per_shard, cores, ray_run
            )
            runs[kind].append((took, start_s, load))
            got = stage_files(work / f"pack_{kind}")
            if want is None:
                want = got
            assert got.keys() == want.keys(), f"{kind} run {i + 1}: other files than the first run's"
            for name, data in got.items():
                assert data == want[name], f"{kind} run {i + 1}: {name} differs from the first local run's"
            started = f" (+ Ray start {start_s:.1f} s)" if ray_run else ""
            print(f"  pack {kind} run {i + 1}: {took:.1f} s{started} ({phases}); {load}", flush=True)
    n_shards = len(manifest["shards"])
    units = pq.ParquetFile(catalog_path(root, "coyo-10m")).num_row_groups  # one tokenization task each
    tasks = units + n_shards
    local_s, _, local_load = min(runs["local"], key=lambda r: r[0])
    ray_s, ray_start, ray_load = min(runs["ray"], key=lambda r: r[0])
    packed = sum(st["samples"] for st in manifest["shards"])
    print(
        f"pack: stage 1, {args.pack_n} captions + web-like images ({packed} samples packed), "
        f"{units} tokenization unit(s) + {n_shards} shards of {args.packs_per_shard} packs = {tasks} tasks, "
        f"{cores} cores; "
        f"best of {args.repeats} alternated runs each"
    )
    print(f"local processes: {local_s:.1f} s; {local_load}")
    print(
        f"1-node Ray:      {ray_s:.1f} s ({ray_s / local_s:.2f}x, {ray_s / local_s - 1:+.1%}); "
        f"cluster start {ray_start:.1f} s not counted (it also starts one idle worker per CPU, which the "
        f"tasks then use; with it: {(ray_s + ray_start) / local_s:.2f}x); {ray_load}"
    )
    print(f"per-task overhead: {(ray_s - local_s) / tasks * 1000:.0f} ms of wall time a task (unit or shard)")
    cpu = {k: [r[2].cpu_s for r in v if r[2].cpu_s is not None] for k, v in runs.items()}
    if cpu["local"] and cpu["ray"]:  # the cost in CPU, which the others' share of the cores does not skew
        lo, hi = min(cpu["local"]), min(cpu["ray"])
        print(
            f"CPU spent (least of the runs): local {lo:.1f} CPU-s, Ray {hi:.1f} CPU-s ({hi / lo:.2f}x), "
            f"{(hi - lo) / tasks * 1000:.0f} CPU-ms a task"
        )
    print(f"shards and manifest byte-identical in all {2 * args.repeats} runs ({len(want or {})} files)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000, help="fetch: images")
    ap.add_argument("--shard-size", type=int, default=250, help="fetch: rows per shard")
    ap.add_argument("--pack-n", type=int, default=1000, help="pack: captions, one image each")
    ap.add_argument("--packs-per-shard", type=int, default=50, help="pack: packs per shard (one task each)")
    ap.add_argument("--repeats", type=int, default=2, help="pack: alternated local / Ray runs")
    ap.add_argument("--skip-fetch", action="store_true")
    ap.add_argument("--skip-pack", action="store_true")
    args = ap.parse_args()
    cores = default_processes()
    if not args.skip_fetch:
        fetch_part(args, cores)
    if not args.skip_pack:
        pack_part(args, cores)


if __name__ == "__main__":
    main()
