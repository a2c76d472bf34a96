"""Peak RSS and wall time of `ovis-data validate`, `pack` and `report` on a coyo-style caption dataset
at 1M and 10M rows, side by side (issue: coyo-10m in bounded memory, target <= 2 GB at 10M rows).

    python benchmarks/scale_10m.py [--rows 1000000 10000000] [--runs validate-meta,...] [--src DIR]

The corpus is synthetic but real to the code: ROOT/meta_files/coyo-10m.parquet (id, image_path, caption)
and ROOT/images/coyo_10m in the shards layout, whose index.parquet maps every row's image_path into four
small tars of 64 JPEGs already at the ViT size (so pack passes them through and measures itself, not
JPEG codecs). About 12% of rows are bad: every 10th names an image the store lacks, every 50th has an
empty caption. A second dataset, coyo-10m-absent, reads the same meta file against an empty image folder
(images absent: every row bad, every row in the report). Corpora are cached under .bench/scale_10m/.

Each run is `ovis-data ...` as a subprocess; peak RSS is that of its whole process tree (main process,
forkserver and workers summed, polled every 50 ms), so workers' shared pages count once per process.
`--src DIR` runs another copy of the package (DIR/ovis_data), e.g. the code before a change.
At the end: each run's CPU-seconds ratio between consecutive sizes (issue 20: pack at 10M rows within 11x
its 1M CPU seconds) and its largest peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pack_corpus import captions, qwen_path  # noqa: E402

RUNS = ("validate-absent", "validate-meta", "validate-header", "validate-deep", "pack", "report",
        "report-exact")  # fmt: skip
TARS, PER_TAR = 4, 64
CHUNK = 1_000_000


def info(root: Path) -> Path:
    path = root / "dataset_info.json"
    entry = {"meta_file": "coyo-10m.parquet", "data_format": "caption", "stage": 1}
    path.write_text(
        json.dumps(
            {
                "coyo-10m": {**entry, "image_dir": "coyo_10m"},
                "coyo-10m-absent": {**entry, "image_dir": "coyo_10m_absent"},
            },
            indent=1,
        )
    )
    return path


def _names(start: int, stop: int, prefix: str = "") -> pa.Array:
    digits = pc.utf8_lpad(pc.cast(pa.array(np.arange(start, stop)), pa.string()), 9, "0")
    return pc.binary_join_element_wise(prefix, digits, ".jpg", "")


def build(root: Path, rows: int) -> None:
    """The corpus of `rows` rows under root (skipped when a finished one is there)."""
    if (root / "done").exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    img_dir = root / "images" / "coyo_10m"
    img_dir.mkdir(parents=True)
    (root / "images" / "coyo_10m_absent").mkdir()
    (root / "meta_files").mkdir()
    # four tars of 64 small JPEGs: (tar, offset, size) of image k
    members = []
    for t in range(TARS):
        with tarfile.open(img_dir / f"{t:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for k in range(PER_TAR):
                buf = io.BytesIO()
                Image.new("RGB", (336, 8 + k), (k * 4, 100 + t * 30, 200)).save(buf, "JPEG", quality=90)
                ti = tarfile.TarInfo(f"{t:05d}{k:04d}.jpg")
                ti.size = len(buf.getvalue())
                tf.addfile(ti, io.BytesIO(buf.getvalue()))
        with tarfile.open(img_dir / f"{t:05d}.tar") as tf:
            members += [(f"{t:05d}.tar", m.offset_data, m.size) for m in tf]
        (img_dir / f"{t:05d}_stats.json").write_text(json.dumps({"successes": PER_TAR}))
    tar_col = np.array([m[0] for m in members])
    off_col = np.array([m[1] for m in members], dtype=np.int64)
    size_col = np.array([m[2] for m in members], dtype=np.int64)
    pool = pa.array(captions(4096), pa.string())
    shards = json.dumps([f"{t:05d}" for t in range(TARS)])
    index_schema = pa.schema(
        [("image_path", pa.string()), ("tar", pa.string()), ("offset", pa.int64()), ("size", pa.int64())]
    ).with_metadata({"shards": shards})
    meta = pq.ParquetWriter(root / "meta_files" / "coyo-10m.parquet", _META_SCHEMA)
    index = pq.ParquetWriter(img_dir / "index.parquet", index_schema)
    for s in range(0, rows, CHUNK):
        e = min(rows, s + CHUNK)
        i = np.arange(s, e)
        k = i % len(members)
        index.write_table(
            pa.table(
                [_names(s, e), pa.array(tar_col[k]), pa.array(off_col[k]), pa.array(size_col[k])],
                schema=index_schema,
            )
        )
        missing = i % 10 == 9
        paths = pc.if_else(pa.array(missing), _names(s, e, "gone/"), _names(s, e))
        caption = pc.take(pool, pa.array(i % len(pool)))
        caption = pc.if_else(pa.array(i % 50 == 3), pa.scalar("", pa.string()), caption)
        ids = pc.binary_join_element_wise("coyo-", pc.cast(pa.array(i), pa.string()), "")
        meta.write_table(pa.table([ids, paths, caption], schema=_META_SCHEMA))
    meta.close()
    index.close()
    (root / "done").write_text("ok\n")


_META_SCHEMA = pa.schema([("id", pa.string()), ("image_path", pa.string()), ("caption", pa.string())])


def measure(cmd: list[str], env: dict, limit: float | None = None) -> tuple[float, float, int, str, float]:
    """(peak RSS of the process tree in MiB, wall seconds, exit status, last output line, CPU seconds of
    the tree). Past `limit` seconds the tree is stopped: exit status -9, the figures those of a partial
    run. CPU seconds (user + system, every process's last reading) say how the work grows with rows
    when other jobs share the cores and stretch the wall time."""
    t = time.perf_counter()
    # cwd: `python -m` puts it first on sys.path, so it decides which ovis_data runs
    proc = subprocess.Popen(
        cmd, env=env, cwd=env["PYTHONPATH"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    ps = psutil.Process(proc.pid)
    peak = 0
    cpu: dict[int, float] = {}
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            tree = [ps, *ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        total = 0
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
                times = p.cpu_times()
                cpu[p.pid] = times.user + times.system
        peak = max(peak, total)
        if limit is not None and time.perf_counter() - t > limit:
            for p in reversed(tree):
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
        time.sleep(0.05)
    proc.wait()
    reader.join()
    dt = time.perf_counter() - t
    last = next((line.strip() for line in reversed(out) if line.strip()), "")
    if proc.returncode not in (0, 1):
        print("".join(out[-30:]), file=sys.stderr)
    return peak / 2**20, dt, proc.returncode, last, sum(cpu.values())


def command(run: str, root: Path, info_path: Path, out: Path) -> list[str]:
    base = [sys.executable, "-m", "ovis_data"]
    common = ["--root", str(root), "--dataset-info", str(info_path), "--quiet"]
    if run == "pack":
        return [*base, "pack", "--stage", "1", *common, "--tokenizer", qwen_path(), "--out", str(out),
                "--max-length", "4096"]  # fmt: skip
    if run.startswith("report"):  # the data report of the catalog (approximate or exact token counts)
        exact = ["--tokenizer", qwen_path()] if run == "report-exact" else []
        return [*base, "report", "coyo-10m", *common, *exact, "--out", str(out / "report.html")]
    if run == "validate-absent":
        return [*base, "validate", "coyo-10m-absent", *common, "--meta-only", "--report",
                str(out / "report.json"), "--catalog-dir", str(out / "catalogs")]  # fmt: skip
    mode = {"validate-meta": ["--meta-only"], "validate-header": [], "validate-deep": ["--deep"]}[run]
    return [*base, "validate", "coyo-10m", *common, *mode, "--report", str(out / "report.json")]


def print_growth(figures: dict[str, dict[int, tuple]], sizes: list[int]) -> None:
    """How each run's CPU seconds grew with the rows, between consecutive sizes (issue 20: pack at 10M rows
    at most 11x its CPU seconds at 1M), and its largest peak RSS (target <= 2 GB). CPU seconds, not wall:
    other jobs on the cores stretch the wall time more than the CPU time."""
    print("\nCPU seconds between sizes (a ratio at most the rows' ratio: linear or better):")
    for run, by_rows in figures.items():
        done = [n for n in sizes if n in by_rows and by_rows[n][2] in (0, 1)]  # finished runs only
        for small, large in zip(done, done[1:], strict=False):
            ratio = by_rows[large][3] / max(by_rows[small][3], 1e-9)
            print(
                f"  {run:16s} {large:>11,} / {small:,} rows ({large / small:.1f}x the rows): "
                f"{ratio:.2f}x the CPU seconds ({by_rows[small][3]:,.0f} -> {by_rows[large][3]:,.0f})"
            )
        if done:
            print(f"  {run:16s} largest peak RSS: {max(by_rows[n][0] for n in done):,.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {','.join(RUNS)}")
    ap.add_argument("--work", type=Path, default=ROOT / ".bench" / "scale_10m")
    ap.add_argument("--src", type=Path, default=ROOT, help="folder holding the ovis_data to run")
    ap.add_argument("--json", type=Path, default=None, help="also append the figures to this file")
    ap.add_argument("--limit", type=float, default=None, help="stop a run after this many seconds")
    args = ap.parse_args()
    args.work = args.work.resolve()  # the runs' working directory is --src: paths must not be relative
    runs = [r for r in args.runs.split(",") if r]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        ap.error(f"unknown runs {unknown}")
    env = {**os.environ, "PYTHONPATH": str(args.src.resolve())}
    figures: dict[str, dict[int, tuple[float, float, int]]] = {r: {} for r in runs}
    for rows in args.rows:
        root = args.work / f"corpus-{rows}"
        t = time.perf_counter()
        build(root, rows)
        meta_mb = (root / "meta_files" / "coyo-10m.parquet").stat().st_size / 2**20
        print(
            f"corpus of {rows:,} rows ready ({meta_mb:,.0f} MiB meta file) in {time.perf_counter() - t:.0f} s"
        )
        info_path = info(root)
        for run in runs:
            out = args.work / f"out-{rows}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            needs_catalog = run in ("pack", "report", "report-exact")
            if needs_catalog and not (root / "catalogs" / "coyo-10m.parquet").exists():
                measure(command("validate-meta", root, info_path, out), env)
            rss, dt, rc, last, cpu = measure(command(run, root, info_path, out), env, args.limit)
            figures[run][rows] = (rss, dt, rc, cpu)
            print(
                f"  {run:16s} {rows:>11,} rows: peak {rss:7,.0f} MiB, {dt:7.1f} s, {cpu:7.1f} CPU-s, "
                f"exit {rc} [{last[:60]}]"
            )
            sys.stdout.flush()
            shutil.rmtree(out, ignore_errors=True)
    sizes = args.rows
    head = "| run | " + " | ".join(f"{n:,} rows: peak RSS, time, CPU" for n in sizes) + " |"
    print("\n" + head + "\n|---|" + "---|" * len(sizes))
    for run in runs:
        cells = [
            f"{figures[run][n][0]:,.0f} MiB, {figures[run][n][1]:,.1f} s, {figures[run][n][3]:,.0f} CPU-s"
            + (" (stopped: partial run)" if figures[run][n][2] == -9 else "")
            if n in figures[run]
            else "-"
            for n in sizes
        ]
        print(f"| {run} | " + " | ".join(cells) + " |")
    print_growth(figures, sizes)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"src": str(args.src), "figures": figures}) + "\n")


if __name__ == "__main__":
    main()
