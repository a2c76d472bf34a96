"""Per-dataset counts and histograms, computed by DuckDB over validate's catalogs and rejected rows.

Each histogram is two scans of one integer column (range and quantiles, then bin counts), under the
bounded connection validate uses: a 10M-row catalog never becomes Python objects here.
"""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .svg import Histogram

MAX_BINS = 30
# Without a tokenizer, text tokens are estimated from characters: about 4 per token for English with
# the byte-level BPE tokenizers of Qwen2.5 and Llama 3 (fewer for CJK text, where this undercounts).
CHARS_PER_TOKEN = 4


def sql_path(path: Path) -> str:
    """A file path as a quoted SQL string literal."""
    return "'" + str(path).replace("'", "''") + "'"


def nice_width(span: int, bins: int = MAX_BINS) -> int:
    """A bin width of 1, 2 or 5 times a power of ten that covers `span` values in at most `bins` bins."""
    raw = max(1, math.ceil(span / bins))
    scale = 10 ** (len(str(raw)) - 1)
    for m in (1, 2, 5, 10):
        if m * scale >= raw:
            return m * scale
    return 10 * scale  # pragma: no cover


def histogram(
    con: duckdb.DuckDBPyConnection, source: str, title: str, unit: str = "", note: str = ""
) -> Histogram:
    """The histogram of column `x` (integers; nulls skipped) of the query `source`."""
    where = f"FROM ({source}) WHERE x IS NOT NULL"
    n, lo, hi, med, p95 = con.execute(
        f"SELECT count(x), min(x), max(x), quantile_disc(x, 0.5), quantile_disc(x, 0.95) {where}"
    ).fetchall()[0]
    if not n:
        return Histogram(title, 0, 1, [], unit, note, {"n": 0})
    lo, hi = int(lo), int(hi)
    width = nice_width(hi - lo + 1)
    start = (lo // width) * width
    counts = [0] * ((hi - start) // width + 1)
    rows = con.execute(f"SELECT (x - {start}) // {width} AS b, count(*) {where} GROUP BY b").fetchall()
    for b, c in rows:
        counts[int(b)] = int(c)
    summary = {"n": int(n), "min": lo, "median": int(med), "p95": int(p95), "max": hi}
    return Histogram(title, start, width, counts, unit, note, summary)


def array_histogram(
    con: duckdb.DuckDBPyConnection, values: np.ndarray, title: str, unit: str = "", note: str = ""
) -> Histogram:
    """The same histogram of values computed here (exact token counts, sampled image sizes)."""
    con.register("report_values", pa.table({"x": pa.array(np.asarray(values, dtype=np.int64))}))
    try:
        return histogram(con, "SELECT x FROM report_values", title, unit, note)
    finally:
        con.unregister("report_values")


def catalog_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def check_mode(path: Path) -> str | None:
    """How deeply validate checked the images of a catalog: meta, header or deep."""
    value = (pq.read_schema(path).metadata or {}).get(b"ovis_check")
    return value.decode() if value else None


def rejected_by_reason(con: duckdb.DuckDBPyConnection, rejected: Path) -> dict[str, int]:
    rows = con.execute(
        f"SELECT reason, count(*) FROM read_parquet({sql_path(rejected)}) GROUP BY 1 ORDER BY 2 DESC, 1"
    ).fetchall()
    return {r: int(n) for r, n in rows}


def text_chars_sql(catalog: Path, data_format: str) -> str:
    if data_format == "caption":
        expr = "length(coalesce(caption, ''))"
    else:
        expr = "coalesce(list_sum(list_transform(texts, lambda t: length(t))), 0)"
    return f"SELECT {expr} AS x FROM read_parquet({sql_path(catalog)})"


def approximate_tokens(con: duckdb.DuckDBPyConnection, catalog: Path, data_format: str) -> Histogram:
    chars = text_chars_sql(catalog, data_format)
    return histogram(
        con,
        f"SELECT CAST(ceil(x / {CHARS_PER_TOKEN}) AS BIGINT) AS x FROM ({chars})",
        "text tokens (approximate)",
        "tokens",
        f"approximate: characters / {CHARS_PER_TOKEN}, template not counted (--tokenizer DIR counts "
        "exactly); each image adds the recipe's visual tokens in a packed sequence",
    )


def turns(con: duckdb.DuckDBPyConnection, catalog: Path) -> Histogram:
    return histogram(
        con,
        f"SELECT len(list_filter(roles, lambda r: r = 'gpt')) AS x FROM read_parquet({sql_path(catalog)})",
        "turns per sample",
        "turns",
        "answers (gpt turns) per conversation",
    )


def images_per_sample(con: duckdb.DuckDBPyConnection, catalog: Path) -> Histogram:
    return histogram(
        con,
        f"SELECT len(coalesce(images, [])) AS x FROM read_parquet({sql_path(catalog)})",
        "images per sample",
        "images",
    )


def sizes_recorded(con: duckdb.DuckDBPyConnection, catalog: Path) -> bool:
    """Whether validate recorded image sizes (it does unless it ran with --meta-only)."""
    n = con.execute(
        f"SELECT count(*) FROM read_parquet({sql_path(catalog)}) WHERE len(widths) > 0"
    ).fetchall()[0][0]
    return bool(n)


SIZE_TITLE = "image longer side"


def image_sizes(con: duckdb.DuckDBPyConnection, catalog: Path) -> Histogram:
    return histogram(
        con,
        f"""SELECT greatest(w, h) AS x FROM (
              SELECT unnest(widths) AS w, unnest(heights) AS h FROM read_parquet({sql_path(catalog)}))""",
        SIZE_TITLE,
        "px",
        "every image, as validate measured it",
    )


def sampled_image_sizes(con: duckdb.DuckDBPyConnection, sizes: list[tuple[int, int]]) -> Histogram:
    return array_histogram(
        con,
        np.array([max(w, h) for w, h in sizes], dtype=np.int64),
        SIZE_TITLE,
        "px",
        f"from a seeded sample of {len(sizes)} images (validate --meta-only recorded no sizes)",
    )
