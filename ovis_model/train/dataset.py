"""Training data, worker side: one stage's packed shards -> model-ready micro-batches, per rank and worker.

`PackedStage` is a `torch.utils.data.IterableDataset` over `OUT/stageN/` (shards + manifest.json): it
follows the epoch plan of `ovis_model.train.plan` (seeded shard order, equal spans per rank, a windowed
shuffle, micro-batches by a token budget, the same number of micro-batches on every rank). Each
DataLoader worker yields the micro-batches t = start + w, start + w + W, ... of its rank, so that the
DataLoader's round-robin hands them out in plan order. A worker reads the tars sequentially through
`ovis_data.shards.iter_records`, seeking past records it does not need, decodes and preprocesses
images (the model's image processor) and collates with `collate_packed`. `TrainLoader`
(ovis_model.train.loader) runs the DataLoader over it.

Tars are read with plain `tarfile` (ovis_data.shards) rather than the webdataset library: the plan
needs random skips inside a shard and exact record indices for error messages and resume, which
webdataset's streaming pipeline does not expose.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ovis_data.shardformat import Record, ShardError, expanded_length, placeholder_mismatch, read_manifest
from ovis_data.shards import iter_records
from ovis_data.storage import as_path

from ..batching import collate_packed
from ..constants import IGNORE_INDEX
from ..preprocess import OvisImageProcessor, decode_rgb
from .plan import DEFAULT_WINDOW, RankPlan, ShardTable, epoch_plan
from .wire import SlotRing, slot_bytes, to_shared


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else torch.distributed's, else the launcher's RANK / WORLD_SIZE, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def empty_micro_batch(pad_token_id: int) -> dict:
    """One padding token, nothing supervised, no image: what a rank computes when bad shards took all
    the records of one of its micro-batches (it must still join the step's collectives)."""
    return {
        "input_ids": np.asarray([pad_token_id], np.int32),
        "labels": np.asarray([IGNORE_INDEX], np.int32),
        "lengths": np.asarray([1], np.int32),
        "images": [],
    }


class PackedStage(IterableDataset):
    """Micro-batches of one rank over a packed stage, split among DataLoader workers (see module doc)."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        micro_batch_tokens: int,
        image_processor: OvisImageProcessor,
        num_visual_tokens: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        window: int = DEFAULT_WINDOW,
        layout: str = "concat",
        pad_token_id: int = 0,
        pad_to_multiple_of: int | None = None,
        skip_bad_shards: bool = False,
    ) -> None:
        self.data_dir = as_path(data_dir)
        self.manifest, self.manifest_path = read_manifest(self.data_dir)
        self.table = ShardTable.from_manifest(self.manifest, str(self.manifest_path))
        if self.table.n_records == 0:
            raise ValueError(f"{self.manifest_path}: the stage has no packed records")
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.micro_batch_tokens = int(micro_batch_tokens)
        self.image_processor = image_processor
        self.num_visual_tokens = int(num_visual_tokens)
        self.seed, self.window, self.layout = int(seed), int(window), layout
        self.pad_token_id, self.pad_to_multiple_of = int(pad_token_id), pad_to_multiple_of
        self.skip_bad_shards = skip_bad_shards
        self.epoch, self.start = 0, 0  # where the next iteration begins (set by TrainLoader)
        self.ring: SlotRing | None = None  # the workers' shared buffers (set by TrainLoader)
        self._plans: dict[int, RankPlan] = {}
        # elastic resume: the records of `excluded_epoch` an earlier run (another world size or budget)
        # consumed, left out of that epoch's plan (a bool mask over the records; set by TrainLoader)
        self.excluded_epoch: int | None = None
        self.excluded: np.ndarray | None = None
        self.plan(0)  # a budget below the capacity fails here, before any worker starts

    def plan(self, epoch: int) -> RankPlan:
        if epoch not in self._plans:
            self._plans = {
                epoch: epoch_plan(
                    self.table,
                    seed=self.seed,
                    epoch=epoch,
                    rank=self.rank,
                    world_size=self.world_size,
                    micro_batch_tokens=self.micro_batch_tokens,
                    window=self.window,
                    excluded=self.excluded if epoch == self.excluded_epoch else None,
                )
            }
        return self._plans[epoch]

    def exclude(self, epoch: int | None, mask: np.ndarray | None) -> None:
        """Leave the records of `mask` out of `epoch`'s plan (None: no record left out)."""
        self.excluded_epoch, self.excluded = epoch, mask
        self._plans = {}

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = int(epoch), int(start)

    # -- worker side ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        """This worker's share of the endless stream of micro-batches from (epoch, start) on: positions
        w, w + W, w + 2W, ... of the stream, epoch after epoch (one DataLoader serves the whole run)."""
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, offset = self.epoch, self.start + worker  # offset: this worker's next micro-batch in `epoch`
        while True:
            plan = self.plan(epoch)
            mine = range(offset, plan.n_batches, n_workers)
            yield from self._epoch_batches(plan, mine)
            offset = (mine[-1] + n_workers if mine else offset) - plan.n_batches
            epoch += 1

    def _epoch_batches(self, plan: RankPlan, mine: range) -> Iterator[dict]:
        if not mine:
            return
        records = self._read_needed(plan, mine)
        for t in mine:
            parts: list[dict] = []
            bad: list[dict] = []
            lost = 0
            for rid in plan.batch(t).tolist():
                got, rec, events = next(records)
                if got != rid:  # reading follows the plan; anything else is a bug, never silent
                    raise RuntimeError(f"loader read record {got} where the plan has {rid}")
                bad.extend(events)
                if rec is None:
                    lost += 1
                else:
                    parts.append(rec)
            yield self._collate(plan, t, parts, bad, lost)

    def _read_needed(self, plan: RankPlan, mine: range) -> Iterator[tuple[int, dict | None, list[dict]]]:
        """(record id, decoded record or None if lost, bad events) for every record of `mine`, in the
        order the micro-batches use them. Tars are read sequentially; records are held until used."""
        wanted_ids = np.concatenate([plan.batch(t) for t in mine])
        pos = np.concatenate([plan.span_pos[plan.batch_offsets[t] : plan.batch_offsets[t + 1]] for t in mine])
        by_pos = wanted_ids[np.argsort(pos, kind="stable")]
        reader = self._read_in_span_order(by_pos)
        held: dict[int, tuple[dict | None, list[dict]]] = {}
        for rid in wanted_ids.tolist():
            while rid not in held:
                got_id, rec, events = next(reader)
                held[got_id] = (rec, events)
            rec, events = held.pop(rid)
            yield rid, rec, events

    def _read_in_span_order(self, ids: np.ndarray) -> Iterator[tuple[int, dict | None, list[dict]]]:
        shard_of = np.searchsorted(self.table.starts, ids, "right") - 1
        i = 0
        while i < len(ids):
            s = int(shard_of[i])
            j = i
            while j < len(ids) and shard_of[j] == s:
                j += 1
            base = int(self.table.starts[s])
            locals_ = [int(x) - base for x in ids[i:j].tolist()]
            yield from self._read_shard(s, base, locals_)
            i = j

    def _read_shard(self, s: int, base: int, locals_: list[int]) -> Iterator[tuple[int, dict | None, list]]:
        name = self.table.names[s]
        path = self.data_dir / name
        wanted = set(locals_)
        found: set[int] = set()
        try:
            if isinstance(path, Path) and not path.is_file():  # (a URL: iter_records raises ShardError)
                raise ShardError(path, None, "shard listed in the manifest is missing")
            for index, rec in iter_records(path, wanted, stop_after=max(locals_)):
                found.add(index)
                yield base + index, self._decode(path, index, rec), []
            if len(found) < len(wanted):
                raise ShardError(
                    path,
                    min(wanted - found),
                    f"shard ends before this record (manifest: {int(self.table.counts[s])} records)",
                )
        except ShardError as e:
            if not self.skip_bad_shards:
                raise
            event = {"shard": name, "record": e.record, "reason": e.reason}
            lost = sorted(wanted - found)
            for k, index in enumerate(lost):
                yield base + index, None, [event] if k == 0 else []

    def _decode(self, path: Path, index: int, rec: Record) -> dict:
        """The record as the collator takes it; images stay JPEG bytes until their micro-batch is built
        (a record can wait in the window's buffer: decoded pixels would be ~8x its bytes)."""
        mismatch = placeholder_mismatch(rec.input_ids, len(rec.images))
        if mismatch is not None:
            raise ShardError(path, index, mismatch)
        return {
            "shard": path.name,
            "index": index,
            "key": rec.key,
            "input_ids": rec.input_ids,
            "labels": rec.labels,
            "lengths": rec.lengths,
            "images": rec.images,
        }

    def _decode_images(self, rec: dict) -> list[np.ndarray]:
        images = []
        for k, data in enumerate(rec["images"]):
            try:
                images.append(decode_rgb(data))
            except Exception as e:  # PIL raises many types for damaged JPEGs
                raise ShardError(
                    self.data_dir / rec["shard"], rec["index"], f"image img_{k:03d} cannot be decoded: {e}"
                ) from e
        return images

    def _collate(self, plan: RankPlan, t: int, records: list[dict], bad: list[dict], lost: int) -> dict:
        parts = []
        for rec in records:
            try:
                parts.append({**rec, "images": self._decode_images(rec)})
            except ShardError as e:
                if not self.skip_bad_shards:
                    raise
                bad.append({"shard": rec["shard"], "record": e.record, "reason": e.reason})
                lost += 1
        inputs = collate_packed(
            parts or [empty_micro_batch(self.pad_token_id)],
            self.image_processor,
            self.num_visual_tokens,
            layout=self.layout,
            pad_token_id=self.pad_token_id,
            pad_to_multiple_of=self.pad_to_multiple_of,
            pixels="canvas",  # uint8 over the worker pipe; normalised on the device (batch_to)
        )
        n_supervised = inputs.pop("n_supervised")
        n_images = sum(len(r["images"]) for r in parts)
        tokens = int(inputs["input_ids"].numel())
        return {
            "inputs": self._hand_over(inputs),
            "n_supervised": n_supervised,
            "meta": {
                "epoch": plan.epoch,
                "step": t,
                "keys": [f"{r['shard']}/{r['key']}" for r in parts],
                # each sample of each record: shard/record#sub-sample, stable across runs and world sizes
                "sample_keys": [
                    f"{r['shard']}/{r['key']}#{j}" for r in parts for j in range(len(r["lengths"]))
                ],
                "records": len(parts),
                "samples": sum(len(r["lengths"]) for r in parts),
                "images": n_images,
                # tokens the model sees (images expanded) against tokens computed (with padding)
                "tokens": expanded_length(
                    sum(len(r["input_ids"]) for r in parts), n_images, self.num_visual_tokens
                ),
                "computed": tokens,
                "lost": lost,
                "bad": bad,
            },
        }

    def _hand_over(self, inputs: dict) -> dict:
        """In a worker: the micro-batch's tensors left in shared memory for the main process (wire.py)."""
        info = get_worker_info()
        if info is None:
            return inputs
        return self.ring.put(info.id, inputs) if self.ring is not None else to_shared(inputs)

    def slot_bytes(self) -> int:
        tokens = self.micro_batch_tokens
        if self.pad_to_multiple_of:
            tokens = -(-tokens // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return slot_bytes(tokens, self.num_visual_tokens, self.image_processor.image_size)
