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

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import OvisDataError
from ..shardformat import MANIFEST, shard_index, shard_name
from .manifest import DropReason
from .packing import pack_lengths
from .worker import WORK, PackConfig, Unit

VAL_DIR = "val"
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


def write_val_split(
    cfg: PackConfig,
    val: ValSelection,
    write_shards: Callable[[PackConfig, list[tuple]], list[dict]],
    build_manifest: Callable[[PackConfig, dict, list[dict]], dict],
) -> dict:
    """Pack and write the held-out samples into OUT/stageN/val/ (shards, then its manifest) with the
    stage's settings; `write_shards(cfg, tasks)` and `build_manifest(cfg, datasets, shards)` are the
    stage's own. Resumes like the stage: a shard whose tar and stats are there is not written again."""
    out_dir = Path(cfg.out) / VAL_DIR
    vcfg = replace(cfg, out=str(out_dir), publish=f"{cfg.publish}/{VAL_DIR}" if cfg.publish else None)
    # the training split's mapped image indexes serve the val shards' writers too (hard links: no copy)
    src_index, dst_index = Path(cfg.out) / WORK / "tok" / "index", out_dir / WORK / "tok" / "index"
    if src_index.is_dir():
        dst_index.mkdir(parents=True, exist_ok=True)
        for f in src_index.iterdir():
            dst = dst_index / f.name
            dst.unlink(missing_ok=True)
            try:
                os.link(f, dst)
            except OSError:
                shutil.copyfile(f, dst)
    items = np.concatenate([np.zeros(0, dtype=np.int64), *val.items])
    lengths = np.concatenate([np.zeros(0, dtype=np.int64), *val.lengths])
    images = np.concatenate([np.zeros(0, dtype=np.int64), *val.images])
    packing = pack_lengths(
        lengths,
        cfg.capacity,
        images=images,
        max_images=cfg.max_images,
        buffer_size=cfg.buffer_size,
        seed=cfg.seed,
    )
    samples, sizes = items[packing.order], np.diff(packing.offsets)
    n_shards = math.ceil(packing.n_packs / cfg.packs_per_shard)
    done, tasks = {}, []
    for s in range(n_shards):
        stats_path = out_dir / WORK / "shards" / f"{s:05d}.json"
        if (out_dir / shard_name(cfg.stage, s)).exists() and stats_path.exists():
            done[s] = json.loads(stats_path.read_text(encoding="utf-8"))
            continue
        p0, p1 = s * cfg.packs_per_shard, min(packing.n_packs, (s + 1) * cfg.packs_per_shard)
        tasks.append((s, sizes[p0:p1], samples[packing.offsets[p0] : packing.offsets[p1]]))
    out_dir.mkdir(parents=True, exist_ok=True)
    for st in write_shards(vcfg, tasks):
        done[shard_index(st["name"])] = st
    manifest = build_manifest(vcfg, val.datasets, [done[s] for s in range(n_shards)])
    manifest["split"] = VAL_DIR
    path = out_dir / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(
        json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    os.replace(tmp, path)
    if vcfg.publish is not None:
        from ..storage import as_path

        (as_path(vcfg.publish) / MANIFEST).put_file(path)
    shutil.rmtree(out_dir / WORK / "tok", ignore_errors=True)
    return manifest
