"""`ovis-data get` vs `hf download` + `unzip`, end to end, on the same archives from a local Hub server.

    python benchmarks/get_throughput.py [--size-gb 0.3] [--archives 4] [--jobs 4] [--repeat 1]

Makes ARCHIVES zip files of image-sized random files (incompressible, like JPEGs; cached under
.bench/get_fixtures/), serves them from ovis_data.get.hubserver on 127.0.0.1 as one Hub dataset
repository, then times, from an empty folder each:
  baseline  `hf download REPO --repo-type dataset --local-dir D` (huggingface_hub's CLI, its parallel
            downloads), then `unzip -q` of each archive into one image folder, then the archives deleted
  get       `ovis-data get` of a dataset whose source is that repository's `*.zip` pattern (downloads,
            extraction into staging, placement, done-markers, the meta-only missing-image count)
Both end with the same image folder (checked). Prints seconds, MB/s and the ratio baseline / get.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from ovis_data.get.hubserver import serve_hub  # noqa: E402

REPO = "bench/images"
FILE_SIZE = 150_000  # about a JPEG of a web image


def make_fixtures(folder: Path, total: int, archives: int) -> list[str]:
    """ARCHIVES zips holding `total` bytes of files in all, made once (same size: same files)."""
    repo = folder / "repos" / REPO
    stamp = repo / f".made-{total}-{archives}"
    names = [f"images_{k:02d}.zip" for k in range(archives)]
    if stamp.exists():
        return names
    shutil.rmtree(folder, ignore_errors=True)
    repo.mkdir(parents=True)
    rng = random.Random(0)
    per_archive = total // archives
    for k, name in enumerate(names):
        with zipfile.ZipFile(repo / name, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for i in range(per_archive // FILE_SIZE):
                path = f"part{k}/{i:06d}.jpg"
                zf.writestr(path, rng.randbytes(FILE_SIZE))
    stamp.touch()
    return names


def tree_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file() and ".get" not in p.parts]
    return len(files), sum(p.stat().st_size for p in files)


CPU = {"baseline": 0.0, "get": 0.0}  # CPU seconds (user + sys) of the commands: steadier than wall time
# on a loaded machine


def run(cmd: list[str], env: dict, what: str) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU[what] += after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=0.3, help="total archive size (default 0.3)")
    ap.add_argument("--archives", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=4, help="get --jobs")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each; the best is kept")
    ap.add_argument("--work", type=Path, default=REPO_ROOT / ".bench" / "get_fixtures")
    args = ap.parse_args()
    total = int(args.size_gb * 1e9)
    names = make_fixtures(args.work, total, args.archives)
    size = sum((args.work / "repos" / REPO / n).stat().st_size for n in names)
    bin_dir = Path(sys.executable).parent
    hf = shutil.which("hf", path=str(bin_dir)) or shutil.which("hf")
    if hf is None or shutil.which("unzip") is None:
        sys.exit("needs huggingface_hub's `hf` CLI and `unzip`")
    info = args.work / "info.json"
    info.write_text(json.dumps({"bench": {
        "meta_file": "bench.json", "image_dir": "bench", "data_format": "conversation", "stage": 3,
        "source": {"images": [{"hub": REPO, "pattern": "*.zip"}]}}}))  # fmt: skip
    out = args.work / "out"
    best = {"baseline": float("inf"), "get": float("inf")}
    with serve_hub(args.work / "repos") as server:
        env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HOME": str(args.work / "hf-home"),
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "PYTHONPATH": str(REPO_ROOT)}  # fmt: skip
        for _ in range(args.repeat):
            shutil.rmtree(out, ignore_errors=True)
            dl, images = out / "hf", out / "hf-images"
            t = run([hf, "download", REPO, "--repo-type", "dataset", "--local-dir", str(dl)], env, "baseline")
            for name in names:
                t += run(["unzip", "-q", "-o", str(dl / name), "-d", str(images)], env, "baseline")
                t0 = time.perf_counter()
                (dl / name).unlink()
                t += time.perf_counter() - t0
            best["baseline"] = min(best["baseline"], t)
            reference = tree_size(images)
            root = out / "get-root"
            cmd = [sys.executable, "-m", "ovis_data", "get", "bench", "--dataset-info", str(info),
                   "--root", str(root), "--jobs", str(args.jobs), "--quiet"]  # fmt: skip
            best["get"] = min(best["get"], run(cmd, env, "get"))
            got = tree_size(root / "images" / "bench")
            if got != reference:
                sys.exit(f"different results: hf+unzip {reference}, get {got}")
    shutil.rmtree(out, ignore_errors=True)
    mb = size / 1e6
    print(f"{len(names)} archives, {mb:,.0f} MB, {reference[0]:,} files, one Hub server on 127.0.0.1")
    for what, label in (("baseline", "hf download + unzip"), ("get", f"ovis-data get --jobs {args.jobs}")):
        cpu = CPU[what] / args.repeat
        print(f"  {label:28s} {best[what]:7.2f} s  {mb / best[what]:7.1f} MB/s  (CPU {cpu:.2f} s per run)")
    print(f"ratio (hf download + unzip) / get: {best['baseline'] / best['get']:.2f}x")


if __name__ == "__main__":
    main()
