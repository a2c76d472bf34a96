"""Peak memory of `pack` on 1,000,000 caption samples (target: < 2 GB RSS per process).

    python benchmarks/pack_memory.py [--n 1000000] [--processes 2] [--max-length 4096] [--work DIR]

Builds a stage-1 catalog of n captions over a few small JPEGs already at the ViT size (so images pass
through and the run measures pack's own memory, not JPEG codecs), packs it, and prints the peak RSS of
the main process and of the largest worker, beside the size of the catalog and of the shards.
"""

from __future__ import annotations

import argparse
import io
import resource
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pack_corpus import captions, qwen_path
from PIL import Image

from ovis_data.pack.stage import pack_stage
from ovis_data.validate.catalog import CATALOG_SCHEMA, catalog_path


def build(root: Path, n: int) -> None:
    img_dir = root / "images" / "coyo_10m"
    img_dir.mkdir(parents=True)
    names = []
    for k in range(64):
        buf = io.BytesIO()
        Image.new("RGB", (336, 8 + k), (k * 4, 100, 200)).save(buf, "JPEG", quality=90)
        (img_dir / f"{k:03d}.jpg").write_bytes(buf.getvalue())
        names.append(f"{k:03d}.jpg")
    (root / "meta_files").mkdir()
    path = catalog_path(root, "coyo-10m")
    path.parent.mkdir(parents=True)
    text = captions(min(n, 100_000))
    with pq.ParquetWriter(path, CATALOG_SCHEMA) as w:
        for s in range(0, n, 131_072):
            m = min(n, s + 131_072) - s
            w.write_table(
                pa.table(
                    {
                        "dataset": ["coyo-10m"] * m,
                        "row": pa.array(range(s, s + m), pa.int64()),
                        "id": [f"coyo-10m-{i}" for i in range(s, s + m)],
                        "images": [[names[i % 64]] for i in range(s, s + m)],
                        "roles": pa.nulls(m, pa.list_(pa.string())),
                        "texts": pa.nulls(m, pa.list_(pa.string())),
                        "caption": [text[i % len(text)] for i in range(s, s + m)],
                        "widths": [[336]] * m,
                        "heights": [[8 + i % 64] for i in range(s, s + m)],
                    },
                    schema=CATALOG_SCHEMA,
                )
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--processes", type=int, default=1)  # 1: every phase in this process, all measured
    ap.add_argument("--max-length", type=int, default=4096)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.work))
    try:
        build(work / "data", args.n)
        t = time.perf_counter()
        m = pack_stage(
            1, work / "data", qwen_path(), work / "out", processes=args.processes, max_length=args.max_length
        )
        dt = time.perf_counter() - t
        main_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        shards = sum(p.stat().st_size for p in (work / "out" / "stage1").glob("*.tar")) / 2**20
        catalog = catalog_path(work / "data", "coyo-10m").stat().st_size / 2**20
        print(
            f"{args.n:,} captions -> {m['records']:,} sequences of {m['capacity']} "
            f"in {len(m['shards'])} shards, "
            f"fill {m['fill']:.2%}, {dt:.0f} s ({args.n / dt:,.0f} samples/s, {args.processes} processes)"
        )
        print(
            f"peak RSS: main {main_rss:,.0f} MiB, largest worker {child_rss:,.0f} MiB (target < 2048 MiB); "
            f"catalog {catalog:,.0f} MiB, shards {shards:,.0f} MiB"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
