"""The gallery: seeded random good and rejected samples of a dataset, with their pictures, and the good
ones' conversations split into supervised and unsupervised runs by `inspect`'s own `segments`.

A sample's place in the seeded order is DuckDB's hash of "row:seed" (its row in the file), computed in one
scan that keeps only the top few rows: the same catalog and seed always give the same samples, at any size.
(A string, not hash(row, seed): DuckDB hashes the integer 0 to 0, which would put row 0 first for seed 0.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from ..constants import IGNORE_ID
from ..pack.inspect import segments
from ..storage import AnyPath
from .images import Picture, picture, read_images
from .stats import sql_path
from .tokens import SampleRenderer

SEEDED_ORDER = "hash(file_row_number::VARCHAR || ':' || $seed::VARCHAR), file_row_number"
MAX_PICTURES = 4  # per sample shown (a sample may name dozens of images)


@dataclass
class GoodCard:
    row: int
    id: str
    pictures: list[Picture]
    segments: list[dict] = field(default_factory=list)  # inspect.segments: {"text","supervised"} | {"image"}
    length: int = 0  # input ids, one per image placeholder
    supervised: int = 0
    error: str | None = None  # why the template refuses it (pack drops it as template_error)


@dataclass
class RejectedCard:
    row: int
    id: str
    reason: str
    detail: str
    pictures: list[Picture]


def seeded_good(con: duckdb.DuckDBPyConnection, catalog: Path, k: int, seed: int) -> list[dict]:
    """k good samples in the seeded order, returned by row."""
    rows = con.execute(
        f"""SELECT * EXCLUDE (file_row_number) FROM read_parquet({sql_path(catalog)}, file_row_number = true)
            ORDER BY {SEEDED_ORDER} LIMIT $k""",
        {"seed": seed, "k": k},
    ).fetchall()
    names = [d[0] for d in con.description]
    return sorted((dict(zip(names, r, strict=True)) for r in rows), key=lambda r: r["row"])


def seeded_rejected(con: duckdb.DuckDBPyConnection, rejected: Path, k: int, seed: int) -> list[dict]:
    """k rejected samples: the seeded first of each reason, then the second of each, and so on, so that
    rare reasons are shown beside common ones."""
    images = "images" if "images" in pq.read_schema(rejected).names else "[]::VARCHAR[] AS images"
    rows = con.execute(
        f"""SELECT row, id, reason, detail, {images} FROM (
              SELECT *, row_number() OVER (PARTITION BY reason ORDER BY {SEEDED_ORDER}) AS pick
              FROM read_parquet({sql_path(rejected)}, file_row_number = true))
            WHERE pick <= $k ORDER BY pick, reason LIMIT $k""",
        {"seed": seed, "k": k},
    ).fetchall()
    names = ["row", "id", "reason", "detail", "images"]
    return [dict(zip(names, r, strict=True)) for r in rows]


def _pictures(paths: list[str] | None, found: dict[str, bytes]) -> list[Picture]:
    return [picture(p, found.get(p)) for p in (paths or [])[:MAX_PICTURES]]


def good_cards(
    con: duckdb.DuckDBPyConnection,
    rows: list[dict],
    data_format: str,
    image_dir: AnyPath | None,
    renderer: SampleRenderer,
    caption_template: str | None,
) -> list[GoodCard]:
    if not rows:
        return []
    wanted = [p for r in rows for p in (r["images"] or [])[:MAX_PICTURES]]
    found = read_images(con, image_dir, wanted) if image_dir is not None and wanted else {}
    columns = {c: [r[c] for r in rows] for c in ("caption", "roles", "texts")}
    encoded = renderer.encode(data_format, columns, caption_template)
    cards = []
    for i, r in enumerate(rows):
        card = GoodCard(r["row"], str(r["id"]), _pictures(r["images"], found))
        if i in encoded.errors:
            card.error = encoded.errors[i]
        else:
            ids, labels = encoded.sample(i)
            card.segments = segments(renderer.tok, ids, labels)
            card.length = len(ids)
            card.supervised = int((labels != IGNORE_ID).sum())
        cards.append(card)
    return cards


def rejected_cards(
    con: duckdb.DuckDBPyConnection, rows: list[dict], image_dir: AnyPath | None
) -> list[RejectedCard]:
    wanted = [p for r in rows for p in (r["images"] or [])[:MAX_PICTURES]]
    found = read_images(con, image_dir, wanted) if image_dir is not None and wanted else {}
    return [
        RejectedCard(r["row"], str(r["id"]), r["reason"], r["detail"] or "", _pictures(r["images"], found))
        for r in rows
    ]
