"""The meta-file engine, side by side: DuckDB (what validate runs) versus polars, on the same 1M-sample files.

The work is validate's meta-only pass, both ways, on each file:
1. parse the file into a meta table (row, id, images, roles, texts or caption, reason), with validate's
   per-sample checks: "conversations" a non-empty list of turns with "from" and a text "value", known
   roles, "image" a string or list of strings, `<image>` markers matching the images; for captions,
   "image_path" and "caption" present and a caption not blank once `<image>` and white space are removed;
2. duplicate ids;
3. every image path of a good sample, with the unsafe-path rules, joined against the image listing
   (one directory walk, `ImageStore.listing()`, the same Arrow table for both): absent -> missing_image;
   a sample takes the reason of its first bad image.
DuckDB runs the project's own code (`metafile.load_meta`, `dataset.mark_duplicates`, `mark_paths`,
`fold_images_into_samples`, under validate's connection and memory limit). Polars runs the same rules
written as polars does best: the JSON list read whole (polars has no lazy reader for a JSON list), the
JSON-lines caption file scanned lazily, every step a lazy query collected with the streaming engine.
Both must give the same counts (asserted): samples, each reason, unique image paths, unique paths
missing.

The files are validate_bench's 1M-sample case (its builder: a LLaVA-like JSON list over 200k image
files, ~1% naming an absent image) and a caption file of the same size over the same images, as JSON
lines (~1% absent images, ~1% blank captions). Both are well-shaped, as polars needs: it reads with one
fixed schema, so a sample of another shape (a list of images where a string was, a string as a turn)
fails the whole read, a number caption silently becomes its text, and a turn whose "value" is null
reads like one without "value" (DuckDB says bad_type, polars missing_field); DuckDB re-reads such a file
sample by sample and names each one. On such well-shaped files the two agree on every bad sample's
reason and detail (asserted through a hash of them).

Each engine runs in its own process (peak RSS is its own), alternated, twice; the best of each is kept.
The page cache is warmed first. Other work on the machine skews the figures: each run records the share
of the CPUs other processes took meanwhile (psutil) and the load average before it.

Polars is not a dependency of the project (this is why): install it with the bench extra.

Usage: python benchmarks/polars_vs_duckdb.py [--samples 1000000] [--files 200000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_load import others_cpu_seconds  # noqa: E402
from validate_bench import make_meta  # noqa: E402

ROLES = ["system", "human", "gpt"]
FILES = {  # name -> (meta file, data format); both over validate_bench's image folder "bench"
    "conversation": ("bench.json", "conversation"),
    "caption": ("caps.jsonl", "caption"),
}
ENGINES = ("duckdb", "polars")
WITHIN = 1.20  # the rule: polars within 20% of DuckDB in time and in memory


def make_captions(root: Path, samples: int, files: int) -> None:
    """JSON lines of {"id", "image_path", "caption"} over validate_bench's image files: about 1% name an
    absent image, about 1% have a caption that is blank once cleaned."""
    rng = random.Random(1)
    good = [
        "A photo of a cat sitting on a wooden table near the window.",
        "<image>\na red bus in the rain",
        "Two people walking a dog along a beach at sunset, seen from far away.",
    ]
    blank = ["", "   ", "<image>", "<image>\n  ", "\t<image><image>\n"]
    with open(root / "meta_files" / FILES["caption"][0], "w") as f:
        for i in range(samples):
            k = rng.randrange(files * 101 // 100)
            caption = rng.choice(blank) if rng.random() < 0.01 else rng.choice(good)
            sample = {"id": f"c{i}", "image_path": f"{k % 100:02d}/{k:08d}.jpg", "caption": caption}
            f.write(json.dumps(sample) + "\n")


# -- DuckDB: the project's own code ------------------------------------------------------------------------
def run_duckdb(spec, root: Path, listing) -> dict:
    from ovis_data.duck import bounded_connection
    from ovis_data.validate.dataset import (
        fold_images_into_samples,
        mark_duplicates,
        mark_paths,
    )
    from ovis_data.validate.metafile import load_meta

    class Store:  # mark_paths' view of an ImageStore, with the listing taken once outside the timing
        image_dir, layout = spec.image_path(root), "files"

        def listing(self):
            return listing

    t = time.perf_counter()
    with bounded_connection() as con:
        total = load_meta(con, spec, spec.meta_path(root))
        t_meta = time.perf_counter()
        mark_duplicates(con)
        mark_paths(con, Store())
        fold_images_into_samples(con, with_sizes=False)
        reasons = dict(con.execute("SELECT reason, count(*) FROM meta GROUP BY 1").fetchall())
        paths, missing = con.execute(
            """SELECT count(DISTINCT path), count(DISTINCT path) FILTER (WHERE reason = 'missing_image')
               FROM img"""
        ).fetchall()[0]
        t_end = time.perf_counter()
        bad = con.execute("SELECT row, reason, detail FROM meta WHERE reason IS NOT NULL ORDER BY row")
        bad = bad.fetchall()
    return {
        "total": total,
        "reasons": reasons,
        "unique_paths": paths,
        "unique_missing": missing,
        "meta_s": t_meta - t,
        "engine_s": t_end - t,
        "bad_rows_sha256": _digest(bad),
    }


# -- polars: the same rules, idiomatic ---------------------------------------------------------------------
def run_polars(spec, root: Path, listing) -> dict:
    import polars as pl

    from ovis_data.constants import IMAGE_MARK

    path = spec.meta_path(root)
    str_list = pl.List(pl.String)
    t = time.perf_counter()
    if spec.data_format == "conversation":
        turn = pl.Struct({"from": pl.String, "value": pl.String})
        schema = {"id": pl.String, "image": pl.String, "conversations": pl.List(turn)}
        conv, el = pl.col("conversations"), pl.element()

        def first(cond: pl.Expr) -> pl.Expr:  # index of the first turn where cond holds, else null
            return conv.list.eval(cond.arg_true()).list.first()

        n_img, markers = pl.col("images").list.len(), pl.col("markers")
        bad_turn, missing_turn = pl.col("bad_turn"), pl.col("missing_turn")
        meta = (
            pl.read_json(path, schema=schema)  # a JSON list: read whole, eagerly (no scan for it)
            .lazy()
            .with_row_index("row")
            .with_columns(
                images=pl.when(pl.col("image").is_null())
                .then(pl.lit([], str_list))
                .otherwise(pl.concat_list(pl.col("image"))),
                roles=conv.list.eval(el.struct.field("from")),
                texts=conv.list.eval(el.struct.field("value")),
                bad_turn=first(el.is_null()),
                missing_turn=first(el.struct.field("from").is_null() | el.struct.field("value").is_null()),
            )
            .with_columns(
                unknown_role=pl.col("roles").list.eval(el.filter(~el.is_in(ROLES))).list.first(),
                markers=pl.col("texts").list.eval(el.str.count_matches(IMAGE_MARK, literal=True)).list.sum(),
                missing_key=pl.when(conv.list.get(missing_turn).struct.field("from").is_null())
                .then(pl.lit("from"))
                .otherwise(pl.lit("value")),
            )
            .with_columns(
                reason=pl.when(conv.is_null())
                .then(pl.lit("missing_field"))
                .when(conv.list.len() == 0)
                .then(pl.lit("empty_conversation"))
                .when(bad_turn.is_not_null())
                .then(pl.lit("bad_type"))
                .when(missing_turn.is_not_null())
                .then(pl.lit("missing_field"))
                .when(pl.col("unknown_role").is_not_null())
                .then(pl.lit("unknown_role"))
                .when(pl.lit(spec.image_dir is None) & (n_img > 0))
                .then(pl.lit("unexpected_image"))
                .when(markers != n_img)
                .then(pl.lit("image_marker_mismatch")),
            )
            .with_columns(
                detail=pl.when(conv.is_null())
                .then(pl.lit('no "conversations"'))
                .when(pl.col("reason") == "empty_conversation")
                .then(pl.lit('"conversations" is empty'))
                .when(bad_turn.is_not_null())
                .then(pl.format("conversations[{}] is null, not an object", bad_turn))
                .when(pl.col("reason") == "missing_field")
                .then(pl.format('conversations[{}] has no "{}"', missing_turn, pl.col("missing_key")))
                .when(pl.col("reason") == "unknown_role")
                .then(pl.format('role "{}" is not one of system, human, gpt', pl.col("unknown_role")))
                .when(pl.col("reason") == "unexpected_image")
                .then(pl.lit("text-only dataset (no image_dir) but the sample names images"))
                .when(pl.col("reason") == "image_marker_mismatch")
                .then(pl.format("{} <image> marker(s) for {} image(s)", markers, n_img))
            )
            .select("row", "id", "images", "roles", "texts", "reason", "detail")
        )
    else:
        schema = {"id": pl.String, "image_path": pl.String, "caption": pl.String}
        cap = pl.col("caption")
        meta = (
            pl.scan_ndjson(path, schema=schema)  # JSON lines: scanned lazily
            .with_row_index("row")
            .select(
                "row",
                "id",
                "caption",
                images=pl.when(pl.col("image_path").is_null())
                .then(pl.lit([], str_list))
                .otherwise(pl.concat_list(pl.col("image_path"))),
                reason=pl.when(pl.col("image_path").is_null() | cap.is_null())
                .then(pl.lit("missing_field"))
                .when(cap.str.replace_all(IMAGE_MARK, "", literal=True).str.strip_chars() == "")
                .then(pl.lit("empty_caption")),
                detail=pl.when(pl.col("image_path").is_null())
                .then(pl.lit('no "image_path"'))
                .when(cap.is_null())
                .then(pl.lit('no "caption"'))
                .when(cap.str.replace_all(IMAGE_MARK, "", literal=True).str.strip_chars() == "")
                .then(pl.lit("caption is empty once <image> and surrounding white space are removed")),
            )
        )
    first_row = pl.col("row").min().over("id")
    duplicate = pl.col("reason").is_null() & (first_row != pl.col("row"))
    meta = (
        meta.with_columns(
            id=pl.coalesce("id", pl.lit(f"{spec.name}-") + pl.col("row").cast(pl.String)),
            images=pl.col("images").list.eval(pl.element().str.replace(r"^(\./)+", "")),
        )
        .with_columns(
            reason=pl.when(duplicate).then(pl.lit("duplicate_id")).otherwise("reason"),
            detail=pl.when(duplicate)
            .then(pl.format('id "{}" first seen at row {}', "id", first_row))
            .otherwise("detail"),
        )
        .collect(engine="streaming")
    )
    t_meta = time.perf_counter()
    p = pl.col("path")
    unsafe = (
        pl.when(p == "")
        .then(pl.lit("empty path"))
        .when(p.str.starts_with("/") | p.str.starts_with("\\") | p.str.contains("^[A-Za-z]:"))
        .then(pl.lit("absolute path"))
        .when(p.str.replace_all("\\", "/", literal=True).str.split("/").list.contains(".."))
        .then(pl.lit("'..' segment"))
        .when(p.str.contains("\x00", literal=True))
        .then(pl.lit("NUL byte in path"))
        .when(pl.col("linked_out"))
        .then(pl.lit("symbolic link out of image_dir"))
    )
    img = (
        meta.lazy()
        .filter(pl.col("reason").is_null() & (pl.col("images").list.len() > 0))
        .select("row", path="images", idx=pl.int_ranges(pl.col("images").list.len()))
        .explode("path", "idx")
        .join(pl.from_arrow(listing).lazy(), left_on="path", right_on="image_path", how="left")
        .with_columns(unsafe=unsafe)
        .select(
            "row",
            "idx",
            "path",
            reason=pl.when(pl.col("unsafe").is_not_null())
            .then(pl.lit("unsafe_path"))
            .when(pl.col("linked_out").is_null())
            .then(pl.lit("missing_image")),
            detail=pl.format("{}: {}", p, pl.coalesce("unsafe", pl.lit("no such file"))),
        )
        .collect(engine="streaming")
    )
    first_bad = (  # a sample takes the reason of its first bad image
        img.lazy()
        .filter(pl.col("reason").is_not_null())
        .group_by("row")
        .agg(pl.col("reason", "detail").sort_by("idx").first().name.prefix("image_"))
    )
    meta = (
        meta.lazy()
        .join(first_bad, on="row", how="left")
        .with_columns(
            reason=pl.coalesce("reason", "image_reason"),
            detail=pl.when(pl.col("reason").is_null()).then("image_detail").otherwise("detail"),
        )
        .drop("image_reason", "image_detail")
        .collect(engine="streaming")
    )
    reasons = meta.group_by("reason").len()
    missing = img.filter(pl.col("reason") == "missing_image")["path"].n_unique()
    t_end = time.perf_counter()
    bad = meta.filter(pl.col("reason").is_not_null()).sort("row").select("row", "reason", "detail").rows()
    return {
        "total": meta.height,
        "reasons": dict(reasons.iter_rows()),
        "unique_paths": img["path"].n_unique(),
        "unique_missing": missing,
        "meta_s": t_meta - t,
        "engine_s": t_end - t,
        "bad_rows_sha256": _digest(bad),
    }


def _digest(rows: list[tuple]) -> str:
    """Every bad sample's (row, reason, detail), hashed: both engines must agree on each one."""
    return hashlib.sha256(json.dumps([list(r) for r in rows]).encode()).hexdigest()


def worker(engine: str, root: Path, which: str) -> None:
    """One engine on one file, in this process; prints its counts, times and peak RSS as JSON."""
    t0 = time.perf_counter()
    import pyarrow  # noqa: F401  (both sides use it; the listing is Arrow)

    from ovis_data.imagestore import ImageStore
    from ovis_data.registry import DatasetSpec

    if engine == "duckdb":
        import duckdb  # noqa: F401
    else:
        import polars  # noqa: F401
    t_import = time.perf_counter()
    meta_file, fmt = FILES[which]
    spec = DatasetSpec(which, meta_file, "bench", fmt, 3 if fmt == "conversation" else 1)
    listing = ImageStore(spec.image_path(root)).listing()
    t_listing = time.perf_counter()
    out = (run_duckdb if engine == "duckdb" else run_polars)(spec, root, listing)
    t_end = time.perf_counter()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["reasons"] = {str(k): v for k, v in sorted(out["reasons"].items(), key=lambda kv: str(kv[0]))}
    out.update(
        import_s=t_import - t0,
        listing_s=t_listing - t_import,
        process_s=t_end - t0,
        cpu_s=ru.ru_utime + ru.ru_stime,
        rss_mb=ru.ru_maxrss / 1024,
    )
    print(json.dumps(out))


# -- the machine's other load (as benchmarks/loader_throughput.py measures it) -----------------------------
def measured(engine: str, root: Path, which: str) -> dict:
    load1 = os.getloadavg()[0]
    a, t0 = others_cpu_seconds(), time.time()
    out = subprocess.run(
        [sys.executable, __file__, "--worker", engine, "--workdir", str(root.parent), "--file", which],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    b, wall = others_cpu_seconds(), time.time() - t0
    if out.returncode:
        raise SystemExit(f"{engine} on {which} failed:\n{out.stderr}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["load1_before"] = load1
    r["others_share"] = None if a is None else max(0.0, (b - a) / wall / (os.cpu_count() or 1))
    return r


def _share(r: dict) -> str:
    return "n/a" if r["others_share"] is None else f"{r['others_share']:.0%}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="reuse a folder (default: a temp dir)")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--file", choices=tuple(FILES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.workdir / "root", args.file)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ovis-polars-duckdb-"))
    root = work / "root"
    (root / "meta_files").mkdir(parents=True, exist_ok=True)
    if not (root / "meta_files" / FILES["conversation"][0]).exists():
        print(f"generating {args.samples:,} conversations over {args.files:,} image files in {root} ...")
        make_meta(root, args.samples, args.files)
    if not (root / "meta_files" / FILES["caption"][0]).exists():
        print(f"generating {args.samples:,} captions ...")
        make_captions(root, args.samples, args.files)
    for name, _ in FILES.values():  # warm the page cache for both engines alike
        with open(root / "meta_files" / name, "rb") as f:
            while f.read(1 << 24):
                pass
    import duckdb
    import polars

    cpus = os.cpu_count()
    print(
        f"duckdb {duckdb.__version__}, polars {polars.__version__}, {cpus} CPUs, both engines on all of them"
    )
    verdict = []
    for which, (name, _) in FILES.items():
        size = (root / "meta_files" / name).stat().st_size / 1e6
        print(f"\n## {which}: {args.samples:,} samples ({name}, {size:.0f} MB), {args.files:,} image files")
        runs: dict[str, list[dict]] = {e: [] for e in ENGINES}
        for rep in range(args.repeats):
            for engine in ENGINES if rep % 2 == 0 else ENGINES[::-1]:
                r = measured(engine, root, which)
                runs[engine].append(r)
                print(
                    f"  run {rep + 1} {engine:<6} {r['engine_s']:6.2f} s ({r['meta_s']:.2f} s to the meta "
                    f"table)  peak RSS {r['rss_mb']:5.0f} MB  | load1 before {r['load1_before']:.2f}, "
                    f"other processes used {_share(r)} of the CPUs during the run",
                    flush=True,
                )
        counts = {
            e: {
                k: runs[e][0][k]
                for k in ("total", "reasons", "unique_paths", "unique_missing", "bad_rows_sha256")
            }
            for e in ENGINES
        }
        assert all(r[k] == counts["duckdb"][k] for e in ENGINES for r in runs[e] for k in counts["duckdb"]), (
            runs
        )
        c = counts["duckdb"]
        print(
            f"  same counts both ways: {c['total']:,} samples, reasons {c['reasons']}, "
            f"{c['unique_paths']:,} unique image paths, {c['unique_missing']:,} missing"
        )
        best = {
            e: {k: min(r[k] for r in runs[e]) for k in ("engine_s", "process_s", "cpu_s", "rss_mb")}
            for e in ENGINES
        }
        for e in ENGINES:
            b = best[e]
            print(
                f"  best {e:<6} {b['engine_s']:6.2f} s wall (parse + checks + join; whole process "
                f"{b['process_s']:.2f} s, {b['cpu_s']:.2f} s CPU)  peak RSS {b['rss_mb']:5.0f} MB"
            )
        t = best["polars"]["engine_s"] / best["duckdb"]["engine_s"]
        m = best["polars"]["rss_mb"] / best["duckdb"]["rss_mb"]
        print(f"  polars / duckdb: {t:.2f}x the time, {m:.2f}x the peak memory")
        verdict.append((which, t, m))
    ok = all(t <= WITHIN and m <= WITHIN for _, t, m in verdict)
    print(
        f"\nrule (polars within {WITHIN - 1:.0%} of DuckDB in time and memory on both files): "
        + ("met" if ok else "not met")
        + "; ".join(f" {w}: {t:.2f}x time, {m:.2f}x memory" for w, t, m in verdict)
    )


if __name__ == "__main__":
    main()
