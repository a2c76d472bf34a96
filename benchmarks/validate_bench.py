"""Validation speed, side by side: ours versus the straightforward way, and image checks over cores.

1. Meta-only validation (schema + file existence) of a large conversation meta file against an image
   folder: `json.load` + a per-sample Python loop with `os.path.exists` (the peer) versus
   `validate_dataset(mode="meta")`. Each runs in its own process so that peak RSS is its own.
2. Header and deep validation throughput (images/s) with 1 process versus all cores.

Usage: python benchmarks/validate_bench.py [--samples 1000000] [--files 200000] [--images 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INFO = {
    "bench": {"meta_file": "bench.json", "image_dir": "bench", "data_format": "conversation", "stage": 3},
    "imgs": {"meta_file": "imgs.json", "image_dir": "imgs", "data_format": "conversation", "stage": 3},
    "hdrs": {"meta_file": "hdrs.json", "image_dir": "hdrs", "data_format": "conversation", "stage": 3},
}


def make_meta(root: Path, samples: int, files: int) -> None:
    """A LLaVA-like meta file; about 1% of samples name an image that is not there."""
    img_dir = root / "images" / "bench"
    for d in range(100):
        (img_dir / f"{d:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (img_dir / f"{i % 100:02d}" / f"{i:08d}.jpg").touch()
    rng = random.Random(0)
    with open(root / "meta_files" / "bench.json", "w") as f:
        f.write("[")
        for i in range(samples):
            k = rng.randrange(files * 101 // 100)
            turns = [
                {"from": "human", "value": "<image>\nWhat is in the picture? Describe it briefly."},
                {"from": "gpt", "value": "A photo of a cat sitting on a wooden table near the window."},
            ]
            for _ in range(rng.randrange(3)):
                turns += [
                    {"from": "human", "value": "And what colour is it?"},
                    {"from": "gpt", "value": "It is mostly grey with white paws."},
                ]
            sample = {"id": f"s{i}", "image": f"{k % 100:02d}/{k:08d}.jpg", "conversations": turns}
            f.write(("," if i else "") + json.dumps(sample))
        f.write("]")


PEER = r"""
import json, os, resource, sys, time
root, = sys.argv[1:]
t = time.perf_counter()
with open(os.path.join(root, "meta_files", "bench.json")) as f:
    data = json.load(f)
image_dir = os.path.join(root, "images", "bench")
seen, bad = set(), 0
for s in data:
    conv = s.get("conversations")
    ok = isinstance(conv, list) and len(conv) > 0 and s.get("id") not in seen
    seen.add(s.get("id"))
    if ok:
        ok = all(isinstance(c, dict) and c.get("from") in ("system", "human", "gpt")
                 and isinstance(c.get("value"), str) for c in conv)
    images = s.get("image")
    images = [images] if isinstance(images, str) else (images or [])
    if ok:
        ok = sum(c["value"].count("<image>") for c in conv) == len(images)
    if ok:
        ok = all(os.path.exists(os.path.join(image_dir, p)) for p in images)
    bad += not ok
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": time.perf_counter() - t, "bad": bad, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "rss_mb": ru.ru_maxrss / 1024}))
"""

OURS = r"""
import json, resource, sys, time
from pathlib import Path
from ovis_data.registry import load_registry
from ovis_data.validate.dataset import validate_dataset
root, info = sys.argv[1:]
spec = load_registry(info)["bench"]
t = time.perf_counter()
res = validate_dataset(spec, Path(root), mode="meta")
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": time.perf_counter() - t, "bad": res.bad, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "rss_mb": ru.ru_maxrss / 1024}))
"""


def run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


HEADER_COPIES = 10  # header checks are ~100 us each: more paths than images, so the work dominates


def _rows(names: list[str]) -> list[dict]:
    turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]
    return [{"id": str(i), "image": name, "conversations": turns} for i, name in enumerate(names)]


def make_images(root: Path, n: int) -> None:
    """n web-sized JPEGs for deep checks, and HEADER_COPIES hard links of each for header checks."""
    from ovis_data.demo_corpus import random_image

    rng = random.Random(1)
    img_dir, hdr_dir = root / "images" / "imgs", root / "images" / "hdrs"
    img_dir.mkdir(parents=True, exist_ok=True)
    hdr_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{i:06d}.jpg" for i in range(n)]
    for name in names:
        w = rng.choice([480, 640, 800, 1024])
        random_image(rng, w, w * 3 // 4).save(img_dir / name, quality=90)
        for k in range(HEADER_COPIES):
            os.link(img_dir / name, hdr_dir / f"{k}_{name}")
    (root / "meta_files" / "imgs.json").write_text(json.dumps(_rows(names)))
    links = [f"{k}_{name}" for name in names for k in range(HEADER_COPIES)]
    (root / "meta_files" / "hdrs.json").write_text(json.dumps(_rows(links)))


def image_throughput(root: Path, info: Path, n: int) -> None:
    from ovis_data.registry import load_registry
    from ovis_data.validate.dataset import validate_dataset

    registry = load_registry(info)
    cores = os.cpu_count() or 1
    print(f"\n## image checks (JPEGs 480-1024 px, page cache warm), 1 process vs all {cores} cores")
    for mode, name, count in (("header", "hdrs", n * HEADER_COPIES), ("deep", "imgs", n)):
        rates = {}
        for procs in (1, cores):
            t = time.perf_counter()
            res = validate_dataset(registry[name], root, mode=mode, processes=procs)
            assert res.good == count, res.by_reason
            rates[procs] = count / (time.perf_counter() - t)
        print(
            f"{mode:>6} ({count:,} images): 1 process {rates[1]:7.0f} img/s | {cores} processes "
            f"{rates[cores]:7.0f} img/s | scaling {rates[cores] / rates[1]:.2f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workdir", type=Path, default=None, help="reuse a folder (default: a temp dir)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ovis-validate-bench-"))
    root = work / "root"
    (root / "meta_files").mkdir(parents=True, exist_ok=True)
    info = work / "info.json"
    info.write_text(json.dumps(INFO))
    if not (root / "meta_files" / "bench.json").exists():
        print(f"generating {args.samples:,} samples over {args.files:,} image files in {root} ...")
        make_meta(root, args.samples, args.files)
    size = (root / "meta_files" / "bench.json").stat().st_size / 1e6
    print(f"\n## meta-only validation: {args.samples:,} samples ({size:.0f} MB JSON), {args.files:,} files")
    run(PEER, str(root))  # warm the page cache for both contenders alike
    peer = run(PEER, str(root))
    ours = run(OURS, str(root), str(info))
    assert peer["bad"] == ours["bad"], (peer, ours)
    for name, r in (("peer (json.load + os.path.exists loop)", peer), ("ours (validate --meta-only)", ours)):
        print(
            f"{name:<40} {r['seconds']:6.2f} s wall  {r['cpu_s']:6.2f} s CPU (process, imports included)"
            f"  peak RSS {r['rss_mb']:6.0f} MB"
        )
    wall, cpu, mem = (peer[k] / ours[k] for k in ("seconds", "cpu_s", "rss_mb"))
    print(f"speed-up {wall:.1f}x wall, {cpu:.1f}x CPU; peak memory {mem:.1f}x lower")
    if not (root / "meta_files" / "hdrs.json").exists():
        shutil.rmtree(root / "images" / "imgs", ignore_errors=True)
        make_images(root, args.images)
    image_throughput(root, info, args.images)


if __name__ == "__main__":
    main()
