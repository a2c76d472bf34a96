"""`ovis-data pack --holdout FRACTION`: a validation split kept out of training, in OUT/stageN/val/.

Which samples are held out is a pure function of (seed, dataset, sample id): a 64-bit FNV-1a hash of
`"{seed}\\0{dataset}\\0{id}"`, finished with splitmix64's mixer, read as a number u in [0, 1); a sample is
held out when u < FRACTION. Not Python's `random` nor numpy's generator: the split must not depend on the
order of the catalog, the number of processes or the library's version, and the same sample is held out at
every stage that uses its dataset with the same seed. Every copy a mixture weight makes of a sample goes
to the same side, so no sample is in both splits.

The split is taken from each dataset's *selected* samples (after the mixture weight; each held-out
sample once, whatever its weight), counted per dataset in both manifests (`held_out` in the training
one), dropped by the same reasons as training samples, packed with the same capacity and seed, and
written in the same shard format with its own manifest (`"split": "val"`), before the training manifest:
a stage is complete, val split included, when OUT/stageN/manifest.json is there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..errors import OvisDataError
from .manifest import DropReason
from .worker import Unit

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def check_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 1:
        raise OvisDataError(f"--holdout must be a fraction in [0, 1), got {fraction!r}")
    return float(fraction)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: FNV's high bits alone are poorly mixed for short keys."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def holdout_draws(ids: pa.Array | pa.ChunkedArray, dataset: str, seed: int, rows: np.ndarray) -> np.ndarray:
    """u in [0, 1) per sample, from its id (a sample without an id: from its catalog row), vectorised
    over the id strings' bytes (10M ids of ~20 bytes: ~20 passes over arrays, no Python loop per id)."""
    prefix = np.full(1, _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for b in f"{int(seed)}\0{dataset}\0".encode():
            prefix = (prefix ^ np.uint64(b)) * _FNV_PRIME
        parts = []
        chunks = ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]
        for chunk in chunks:
            chunk = chunk.cast(pa.large_string())
            n = len(chunk)
            offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)[chunk.offset : chunk.offset + n + 1]
            data = chunk.buffers()[2]
            data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
            h = np.full(n, prefix[0], dtype=np.uint64)
            starts, lengths = offsets[:-1], np.diff(offsets)
            for k in range(int(lengths.max()) if n else 0):
                idx = np.flatnonzero(lengths > k)
                h[idx] = (h[idx] ^ data[starts[idx] + k].astype(np.uint64)) * _FNV_PRIME
            parts.append(h)
        h = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
        missing = pc_is_null(ids)
        h[missing] = _mix(h[missing] ^ rows[missing].astype(np.uint64))
        h = _mix(h)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def pc_is_null(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    return ids.is_null().to_numpy(zero_copy_only=False) if ids.null_count else np.zeros(len(ids), bool)


def holdout_mask(tables: list[pa.Table], units: list[Unit], fraction: float, seed: int) -> np.ndarray:
    """Held out or not, per sample of the tokenized units (in the units' order, as pack numbers them)."""
    parts = [
        holdout_draws(t.column("id"), u.dataset, seed, t.column("row").to_numpy()) < fraction
        for t, u in zip(tables, units, strict=True)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


@dataclass
class ValSelection:
    """The held-out samples that can be packed, their lengths, and per dataset what became of them."""

    items: list[np.ndarray] = field(default_factory=list)
    lengths: list[np.ndarray] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    datasets: dict[str, dict] = field(default_factory=dict)


def split_selection(
    chosen: np.ndarray,
    held: np.ndarray,
    dataset: dict,
    name: str,
    val: ValSelection,
    reason: np.ndarray,
    true_len: np.ndarray,
    n_img: np.ndarray,
) -> np.ndarray:
    """The training part of one dataset's selection; the held-out part (each sample once) goes to `val`
    with its drops counted; `dataset` (the training manifest's entry) gains `held_out`."""
    out = held[chosen]
    kept_val = np.unique(chosen[out])
    dataset["held_out"] = int(len(kept_val))
    why = reason[kept_val]
    codes, counts = np.unique(why[why != DropReason.KEPT], return_counts=True)
    val.datasets[name] = {
        "catalog": dataset["catalog"],
        "kept": dataset["kept"],
        "weight": dataset["weight"],
        "selected": int(len(kept_val)),
        "dropped": {
            DropReason(c).label: int(n) for c, n in zip(codes.tolist(), counts.tolist(), strict=True)
        },
    }
    good = kept_val[why == DropReason.KEPT]
    val.items.append(good)
    val.lengths.append(true_len[good])
    val.images.append(n_img[good])
    return chosen[~out]
