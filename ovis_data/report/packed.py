"""A packed stage as the report shows it, from its manifest alone (no shard is opened): fill and records
per shard, the fill of every record, and the samples dropped by reason."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np

from ..errors import OvisDataError
from ..shardformat import FORMAT, MANIFEST
from .stats import array_histogram
from .svg import Histogram, Series

MAX_BARS = 120  # more shards than this: consecutive shards are drawn as one bar


@dataclass
class PackedView:
    path: Path  # the manifest
    manifest: dict
    charts: list[Series | Histogram]


def find_manifest(packed: Path, stage: int | None) -> Path:
    """OUT/stageN/manifest.json for `--packed OUT` (or the stage folder itself)."""
    packed = Path(packed)
    candidates = [packed / MANIFEST] + ([packed / f"stage{stage}" / MANIFEST] if stage is not None else [])
    for c in candidates:
        if c.is_file():
            return c
    where = " or ".join(str(c) for c in candidates)
    raise OvisDataError(f"--packed {packed}: no {where} (pack writes OUT/stageN/{MANIFEST})")


def load_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OvisDataError(f"{path}: not a pack manifest (malformed JSON: {e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise OvisDataError(f"{path}: not a pack manifest (format is not {FORMAT!r})")
    return manifest


def _buckets(values: list[float], labels: list[str], mean: bool) -> tuple[list[float], list[str]]:
    """At most MAX_BARS bars: consecutive items merged (their mean or sum), labelled first-last."""
    if len(values) <= MAX_BARS:
        return values, labels
    edges = np.linspace(0, len(values), MAX_BARS + 1).astype(int)
    out, names = [], []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        part = values[a:b]
        out.append(sum(part) / len(part) if mean else sum(part))
        names.append(f"{labels[a]}-{labels[b - 1]}")
    return out, names


def packed_view(con: duckdb.DuckDBPyConnection, path: Path) -> PackedView:
    m = load_manifest(path)
    capacity = m["capacity"]
    shards = m["shards"]
    labels = [str(i) for i in range(len(shards))]
    fill = [100.0 * s["tokens"] / (s["records"] * capacity) if s["records"] else 0.0 for s in shards]
    records = [float(s["records"]) for s in shards]
    merged = len(shards) > MAX_BARS
    note = f" (consecutive shards merged into {MAX_BARS} bars)" if merged else ""
    fill_values, fill_labels = _buckets(fill, labels, mean=True)
    rec_values, rec_labels = _buckets(records, labels, mean=False)
    record_fill = np.fromiter(
        (100 * t // capacity for s in shards for t in s["record_tokens"]), dtype=np.int64
    )
    charts: list[Series | Histogram] = [
        Series("fill per shard", fill_values, [f"shard {x}" for x in fill_labels], "%", note),
        Series("records per shard", rec_values, [f"shard {x}" for x in rec_labels], "records", note),
        array_histogram(
            con, record_fill, "fill per record", "%", f"tokens of each packed sequence / {capacity}"
        ),
    ]
    return PackedView(path, m, charts)
