"""The epoch plan: which packed records each rank reads, in which order, grouped into which micro-batches.

A pure function of (manifest, seed, epoch, world size), computed from the manifest's per-record token
counts without opening a tar, identically on every rank:

1. shard order: a seeded permutation of the stage's shards (per epoch);
2. the records of the shards in that order form one sequence; rank r takes the r-th of `world_size`
   equal contiguous spans (the last `records % world_size` records of the epoch are dropped, counted);
3. within a span, each window of `window` consecutive records is permuted (seeded per epoch, rank and
   window): a shuffle buffer whose order is known in advance, so the plan needs no data;
4. micro-batches: records in that order, next-fit into a token budget (`micro_batch_tokens`, in tokens
   after expanding each image to its visual tokens): never over budget;
5. equal counts: every rank keeps the first N micro-batches, N the smallest count over ranks, and drops
   the rest of its span (counted). No rank ever waits in a collective for one that ran out.

Elastic resume: `excluded` (a mask over the stage's records) removes the records an interrupted run
already consumed in this epoch before step 2, so the rest of the epoch is planned over the new ranks
from what is left (`consumed_mask` says which records a plan's first micro-batches hold, on every rank).

Dataloader workers split a rank's micro-batches round-robin (micro-batch t goes to worker t mod W), so
the plan, and with it the batches a rank sees, does not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ovis_data.shardformat import MANIFEST

DEFAULT_WINDOW = 1024  # records permuted together: the shuffle buffer's size


@dataclass(frozen=True)
class ShardTable:
    """The manifest's shards as arrays: one entry per record of the stage, in manifest order."""

    names: tuple[str, ...]
    counts: np.ndarray  # records per shard
    starts: np.ndarray  # first record of each shard in the flat arrays
    tokens: np.ndarray  # expanded tokens per record (flat)
    supervised: np.ndarray  # supervised targets per record (flat)

    @classmethod
    def from_manifest(cls, manifest: dict, where: str = MANIFEST) -> ShardTable:
        names, counts, tokens, supervised = [], [], [], []
        for i, shard in enumerate(manifest.get("shards", [])):
            rec_tokens = shard.get("record_tokens")
            if rec_tokens is None:
                raise ValueError(
                    f"{where}: shards[{i}] ({shard.get('name')}) has no record_tokens: packed by an older "
                    "ovis-data; re-run `ovis-data pack` for this stage"
                )
            if len(rec_tokens) != int(shard["records"]):
                raise ValueError(
                    f"{where}: shards[{i}] ({shard['name']}) lists {len(rec_tokens)} record_tokens for "
                    f"{shard['records']} records"
                )
            names.append(shard["name"])
            counts.append(len(rec_tokens))
            tokens.append(np.asarray(rec_tokens, dtype=np.int64))
            supervised.append(np.asarray(shard.get("record_supervised", [0] * len(rec_tokens)), np.int64))
        counts_arr = np.asarray(counts, dtype=np.int64)
        return cls(
            names=tuple(names),
            counts=counts_arr,
            starts=np.concatenate(([0], np.cumsum(counts_arr)[:-1])).astype(np.int64),
            tokens=np.concatenate(tokens) if tokens else np.zeros(0, np.int64),
            supervised=np.concatenate(supervised) if supervised else np.zeros(0, np.int64),
        )

    @property
    def n_records(self) -> int:
        return int(self.counts.sum())


@dataclass(frozen=True)
class RankPlan:
    """One rank's epoch: its micro-batches as runs of (flat) record ids."""

    epoch: int
    rank: int
    shard_order: np.ndarray  # shard indices in this epoch's order (same on every rank)
    records: np.ndarray  # flat record ids in the order they are batched
    span_pos: np.ndarray  # each of `records`' position in the rank's span (reading order)
    batch_offsets: np.ndarray  # micro-batch t = records[batch_offsets[t]:batch_offsets[t+1]]
    summary: dict

    @property
    def n_batches(self) -> int:
        return len(self.batch_offsets) - 1

    def batch(self, t: int) -> np.ndarray:
        return self.records[self.batch_offsets[t] : self.batch_offsets[t + 1]]

    def digest(self) -> str:
        """Identifies the plan (shard order, records and batching) in checkpoints."""
        h = hashlib.sha256()
        for a in (self.shard_order, self.records, self.batch_offsets):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def next_fit(tokens: np.ndarray, budget: int) -> np.ndarray:
    """Offsets of consecutive groups whose token sums stay within `budget` (each item <= budget)."""
    offsets = [0]
    used = 0
    for i, n in enumerate(tokens.tolist()):
        if used + n > budget and used > 0:
            offsets.append(i)
            used = 0
        used += n
    if used > 0:
        offsets.append(len(tokens))
    return np.asarray(offsets, dtype=np.int64)


def _epoch_sequence(table: ShardTable, order: np.ndarray, excluded: np.ndarray | None) -> np.ndarray:
    """The epoch's records in shard order, less the `excluded` ones."""
    seq = (
        np.concatenate([np.arange(table.starts[s], table.starts[s] + table.counts[s]) for s in order])
        if len(order)
        else np.zeros(0, np.int64)
    )
    return seq if excluded is None else seq[~excluded[seq]]


def _rank_order(
    seq: np.ndarray, seed: int, epoch: int, rank: int, world: int, window: int
) -> tuple[np.ndarray, np.ndarray]:
    """(flat record ids of rank's span in batching order, their positions in the span)."""
    per = len(seq) // world
    span = seq[rank * per : (rank + 1) * per]
    rng = np.random.default_rng([seed, epoch, rank, 0x5EED])
    pos = np.arange(len(span), dtype=np.int64)
    for a in range(0, len(span), window):
        pos[a : a + window] = a + rng.permutation(min(window, len(span) - a))
    return span[pos], pos


def epoch_plan(
    table: ShardTable,
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    micro_batch_tokens: int,
    window: int = DEFAULT_WINDOW,
    excluded: np.ndarray | None = None,
) -> RankPlan:
    """Rank `rank`'s plan for `epoch` (see the module docstring). With `excluded` (records already
    consumed in this epoch, a bool mask), the plan may have no micro-batch: the epoch is then over."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    too_long = int(table.tokens.max()) if len(table.tokens) else 0
    if too_long > micro_batch_tokens:
        raise ValueError(
            f"micro-batch budget {micro_batch_tokens} tokens is smaller than a packed record "
            f"({too_long} tokens): raise --micro-batch-tokens to at least the stage's capacity"
        )
    order = np.random.default_rng([seed, epoch]).permutation(len(table.names)).astype(np.int64)
    seq = _epoch_sequence(table, order, excluded)
    per_rank = []
    for r in range(world_size):
        records, pos = _rank_order(seq, seed, epoch, r, world_size, window)
        per_rank.append((records, pos, next_fit(table.tokens[records], micro_batch_tokens)))
    n = min(len(off) - 1 for _, _, off in per_rank)
    if n == 0 and excluded is None:
        raise ValueError(
            f"{table.n_records} packed records cannot give each of {world_size} ranks a micro-batch"
        )
    records, pos, offsets = per_rank[rank]
    kept = int(offsets[n])
    dropped_tail = len(seq) - world_size * (len(seq) // world_size)
    summary = {
        "epoch": epoch,
        "micro_batches": n,
        "records": kept,
        "tokens": int(table.tokens[records[:kept]].sum()),
        "supervised": int(table.supervised[records[:kept]].sum()),
        "dropped_records_rank_split": dropped_tail,  # epoch total, not divisible by the world size
        "dropped_records_equal_batches": int(len(records) - kept),  # this rank's, beyond N micro-batches
        "dropped_records": len(seq) - sum(int(off[n]) for _, _, off in per_rank),  # epoch total, all ranks
        "consumed_before_resume": int(excluded.sum()) if excluded is not None else 0,  # elastic resume
    }
    return RankPlan(epoch, rank, order, records[:kept], pos[:kept], offsets[: n + 1], summary)


def consumed_mask(
    table: ShardTable,
    *,
    seed: int,
    epoch: int,
    world_size: int,
    micro_batch_tokens: int,
    window: int,
    excluded: np.ndarray | None,
    consumed: int,
) -> np.ndarray:
    """The records of `epoch` consumed once every rank of that plan has taken its first `consumed`
    micro-batches, with those `excluded` before it (a bool mask over the stage's records): what an
    elastic resume leaves out of the rest of the epoch."""
    mask = np.zeros(table.n_records, dtype=bool) if excluded is None else excluded.copy()
    for r in range(world_size):
        plan = epoch_plan(
            table,
            seed=seed,
            epoch=epoch,
            rank=r,
            world_size=world_size,
            micro_batch_tokens=micro_batch_tokens,
            window=window,
            excluded=excluded,
        )
        mask[plan.records[: plan.batch_offsets[min(consumed, plan.n_batches)]]] = True
    return mask
