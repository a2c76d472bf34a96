"""The pack stage's second phase (one process, arrays only): each tokenized sample's drop reason, the
mixture weights applied per dataset, then packing (`packing.pack_lengths`) of what is kept."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..recipes import StageRecipe
from ..shardformat import expanded_length
from .holdout import ValSelection, holdout_mask, split_selection
from .manifest import DropReason
from .packing import pack_lengths
from .worker import PackConfig, Unit


@dataclass(frozen=True)
class StagePlan:
    """What the shards will hold: pack p is the samples `samples[offsets[p]:offsets[p + 1]]`, a sample
    being numbered over all units in order (unit u's first is `bases[u]`)."""

    datasets: dict[str, dict]  # per dataset: catalog, kept, weight, selected, dropped (by reason)
    bases: np.ndarray  # first sample number of each unit, then the total
    samples: np.ndarray  # sample numbers, pack after pack
    offsets: np.ndarray  # int64, n_packs + 1
    val: ValSelection | None = None  # the held-out samples (pack --holdout), packed into OUT/stageN/val/

    @property
    def n_packs(self) -> int:
        return len(self.offsets) - 1

    def shard_packs(self, shard: int, packs_per_shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(samples per pack, the samples) of shard number `shard`."""
        p0, p1 = shard * packs_per_shard, min(self.n_packs, (shard + 1) * packs_per_shard)
        return np.diff(self.offsets[p0 : p1 + 1]), self.samples[self.offsets[p0] : self.offsets[p1]]


def drop_reasons(tables: list[pa.Table], cfg: PackConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample: its DropReason code (KEPT = 0), expanded length and image count."""
    if not tables:
        empty = np.zeros(0, dtype=np.int64)
        return empty.astype(np.int8), empty, empty
    parts = []
    for t in tables:  # per unit: only the three results ever span all samples (10M: 170 MB)
        n_tok = pc.list_value_length(t.column("ids")).to_numpy()
        n_img = t.column("n_images").to_numpy().astype(np.int64)
        true_len = expanded_length(n_tok.astype(np.int64), n_img, cfg.visual_tokens)
        reason = np.zeros(len(true_len), dtype=np.int8)
        # assigned from the last reason to the first: where several apply, the first one is counted
        reason[n_img > cfg.max_images] = DropReason.TOO_MANY_IMAGES
        reason[true_len > cfg.capacity] = DropReason.TOO_LONG
        reason[t.column("n_supervised").to_numpy() == 0] = DropReason.NO_LABEL
        reason[n_img != pc.list_value_length(t.column("images")).to_numpy()] = DropReason.IMAGE_MISMATCH
        reason[t.column("error").is_valid().to_numpy(zero_copy_only=False)] = DropReason.TEMPLATE_ERROR
        parts.append((reason, true_len, n_img))
    reason, true_len, n_img = (np.concatenate(x) for x in zip(*parts, strict=True))
    return reason, true_len, n_img


def mixture(kept: np.ndarray, weight: float, seed: int, dataset: str) -> np.ndarray:
    """floor(weight) copies of every kept sample plus a seeded subset for the fraction."""
    whole, frac = int(math.floor(weight)), weight - math.floor(weight)
    parts = [kept] * whole
    if frac > 0 and len(kept):
        rng = np.random.default_rng([seed, zlib.crc32(dataset.encode())])
        parts.append(np.sort(rng.choice(kept, size=int(round(frac * len(kept))), replace=False)))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def plan_stage(cfg: PackConfig, recipe: StageRecipe, units: list[Unit], holdout: float = 0.0) -> StagePlan:
    """Drop by reason, apply the mixture, hold out `holdout` of each dataset's selection (pack.holdout),
    pack: from the units' tokenized samples (memory-mapped)."""
    tables = [pa.ipc.open_file(pa.memory_map(u.path)).read_all() for u in units]
    counts = np.array([t.num_rows for t in tables], dtype=np.int64)
    bases = np.concatenate(([0], np.cumsum(counts)))
    reason, true_len, n_img = drop_reasons(tables, cfg)
    held = holdout_mask(tables, units, holdout, cfg.seed) if holdout else None
    val = ValSelection() if holdout else None
    del tables  # unmapped now: the pages it read (10M samples: ~0.6 GB) leave this process's RSS
    datasets: dict[str, dict] = {}
    items = []
    chosen = why = np.zeros(0, dtype=np.int64)
    for m in recipe.datasets:
        idx = [i for i, u in enumerate(units) if u.dataset == m.name]
        lo, hi = (bases[idx[0]], bases[idx[-1] + 1]) if idx else (0, 0)
        # The mixture draws from the whole catalog; a drawn sample that cannot be packed is dropped with
        # its reason, so per dataset selected = packed + dropped (write-time drops are added by
        # manifest.build_manifest).
        chosen = mixture(np.arange(lo, hi, dtype=np.int64), m.weight, cfg.seed, m.name)
        datasets[m.name] = {}
        if held is not None and val is not None:
            d = {
                "catalog": int(hi - lo),
                "kept": int((reason[lo:hi] == DropReason.KEPT).sum()),
                "weight": m.weight,
            }
            chosen = split_selection(chosen, held, d, m.name, val, reason, true_len, n_img)
            datasets[m.name]["held_out"] = d["held_out"]
        why = reason[chosen]
        items.append(chosen[why == DropReason.KEPT])
        codes, counts = np.unique(why[why != DropReason.KEPT], return_counts=True)
        datasets[m.name] |= {
            "catalog": int(hi - lo),
            # distinct catalog samples that can be packed
            "kept": int((reason[lo:hi] == DropReason.KEPT).sum()),
            "weight": m.weight,
            "selected": int(len(chosen)),
            "dropped": {
                DropReason(c).label: int(n) for c, n in zip(codes.tolist(), counts.tolist(), strict=True)
            },
        }
    # Every array of all samples that is no longer needed goes at once (10M samples: 80 MB each).
    del chosen, why, reason
    items_arr = items[0] if len(items) == 1 else np.concatenate([np.zeros(0, dtype=np.int64), *items])
    del items
    lengths, images = true_len[items_arr], n_img[items_arr]
    del true_len, n_img
    packing = pack_lengths(
        lengths,
        cfg.capacity,
        images=images,
        max_images=cfg.max_images,
        buffer_size=cfg.buffer_size,
        seed=cfg.seed,
    )
    del lengths, images
    return StagePlan(datasets, bases, items_arr[packing.order], packing.offsets, val)
