"""Validation during training: the loss over the held-out split (`ovis-data pack --holdout`, in
DATA/stageN/val/), every `train.eval_every` steps and once at the end, and the best model kept.

The val loss is token-weighted over the whole split and all ranks: the sum of every supervised token's
cross-entropy divided by their count, each record counted exactly once (no epoch-plan drops). The split's
records, in manifest order, are grouped next-fit into micro-batches of the training token budget; rank r
takes the r-th of `world` contiguous runs of them; ranks with fewer run an empty micro-batch (nothing
supervised) so that every rank makes the same number of forwards (ZeRO-3 gathers parameters in each one).
Records are read in the training process (no loader workers): a val split is small by design.

`train.keep_best = true` exports the model to RUN/stageN/model_best whenever the val loss is the lowest so
far (`model_best/val.json` says at which step; a resumed run continues from that value).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ovis_data.pack.holdout import VAL_DIR
from ovis_data.shardformat import MANIFEST, read_manifest
from ovis_data.shards import iter_records
from ovis_data.storage import AnyPath

from ..batching import batch_to, collate_packed
from ..preprocess import decode_rgb
from . import checkpoint
from .dataset import empty_micro_batch
from .loss import all_reduce_sum
from .plan import ShardTable
from .setup import Prepared

BEST_DIR = "model_best"


class ValSplit:
    """One rank's share of a packed val split, as collated micro-batches (see the module doc)."""

    def __init__(
        self,
        val_dir: AnyPath,
        micro_batch_tokens: int,
        image_processor: Any,
        num_visual_tokens: int,
        pad_token_id: int,
        rank: int,
        world: int,
    ) -> None:
        self.val_dir = val_dir
        self.manifest, self.manifest_path = read_manifest(val_dir)
        self.table = ShardTable.from_manifest(self.manifest, str(self.manifest_path))
        self.image_processor, self.num_visual_tokens = image_processor, int(num_visual_tokens)
        self.pad_token_id = int(pad_token_id)
        batches: list[list[int]] = []
        used = micro_batch_tokens
        for rid, tokens in enumerate(self.table.tokens.tolist()):
            if used + tokens > micro_batch_tokens or not batches:
                batches.append([])
                used = 0
            batches[-1].append(rid)
            used += tokens
        self.n_batches = len(batches)
        per_rank = math.ceil(len(batches) / world)
        self.rounds = per_rank  # forwards every rank makes
        self.mine = batches[rank * per_rank : (rank + 1) * per_rank]

    @property
    def records(self) -> int:
        return int(self.table.n_records)

    def micro_batches(self) -> Iterator[dict]:
        """`self.rounds` collated micro-batches: this rank's, then empty ones."""
        wanted = [rid for batch in self.mine for rid in batch]
        records = self._read(wanted)
        for batch in self.mine:
            parts = [next(records) for _ in batch]
            yield self._collate(parts)
        for _ in range(self.rounds - len(self.mine)):
            yield self._collate([empty_micro_batch(self.pad_token_id)])

    def _read(self, ids: list[int]) -> Iterator[dict]:
        ids_arr = np.asarray(ids, dtype=np.int64)
        shard_of = np.searchsorted(self.table.starts, ids_arr, "right") - 1
        for s in np.unique(shard_of).tolist():
            base = int(self.table.starts[s])
            local = [int(x) - base for x in ids_arr[shard_of == s].tolist()]
            for _, rec in iter_records(self.val_dir / self.table.names[s], set(local), stop_after=max(local)):
                yield {
                    "input_ids": rec.input_ids,
                    "labels": rec.labels,
                    "lengths": rec.lengths,
                    "images": [decode_rgb(b) for b in rec.images],
                }

    def _collate(self, parts: list[dict]) -> dict:
        inputs = collate_packed(
            parts,
            self.image_processor,
            self.num_visual_tokens,
            layout="concat",
            pad_token_id=self.pad_token_id,
            pixels="canvas",
        )
        inputs.pop("n_supervised")
        return inputs


def val_loss(
    engine: Any, split: ValSplit, device: torch.device, dtype: torch.dtype | None
) -> tuple[float, int]:
    """(token-weighted loss over the whole split and all ranks, supervised tokens counted)."""
    model = engine.module
    was_training = model.training
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for mb in split.micro_batches():
            out = engine(**batch_to(mb, device, dtype, model.image_processor), loss_normalizer=1.0)
            total[0] += out.loss_sum.double()
            total[1] += out.n_tokens.double()
    if was_training:
        engine.train()
    loss_sum, count = all_reduce_sum(total.tolist(), device)
    return loss_sum / max(count, 1.0), int(count)


class Evaluator:
    """What the loop calls: `after_step(step)` and `at_end(step)` (every rank; only rank 0 writes)."""

    def __init__(
        self,
        prep: Prepared,
        engine: Any,
        device: torch.device,
        bf16: bool,
        rank: int,
        world: int,
        metrics: Any,
        say: Callable[[str], None],
        resume: bool,
    ) -> None:
        cfg, run_dir = prep.cfg.train, prep.run_dir
        self.engine, self.device, self.dtype = engine, device, torch.bfloat16 if bf16 else None
        self.zero_stage = int(engine.zero_optimization_stage())
        self.every, self.keep_best = int(cfg["eval_every"]), bool(cfg["keep_best"])
        self.run_dir, self.metrics, self.main = run_dir, metrics, rank == 0
        self.last_step: int | None = None
        self.best = math.inf
        best_file = run_dir / BEST_DIR / "val.json"
        if resume and best_file.is_file():
            self.best = float(json.loads(best_file.read_text(encoding="utf-8"))["val_loss"])
        self.split: ValSplit | None = None
        val_dir = prep.data_dir / VAL_DIR
        if not (val_dir / MANIFEST).is_file():
            if self.main:
                say(f"  no validation split ({val_dir}: pack with --holdout FRACTION): no val_loss this run")
            metrics.event("no_val_split", {"expected": str(val_dir)})
            return
        model = engine.module
        # the empty micro-batches' one token: id 0, not the pad id, which a tokenizer that gained a token
        # (transformers adds <|endoftext|> to some) may place past the embedding table; nothing is supervised
        pad = 0
        self.split = ValSplit(
            val_dir,
            int(cfg["micro_batch_tokens"]),
            model.image_processor,
            model.num_visual_tokens,
            pad,
            rank,
            world,
        )
        if self.main:
            say(
                f"  validation: {self.split.records} records in {val_dir}, "
                + (f"every {self.every} steps and " if self.every else "")
                + "at the end"
                + ("; the best model kept in " + str(run_dir / BEST_DIR) if self.keep_best else "")
            )

    def after_step(self, step: int) -> None:
        if self.split is not None and self.every and step % self.every == 0:
            self._evaluate(step)

    def at_end(self, step: int) -> float | None:
        """The val loss of the final model (evaluated now unless it was at this step)."""
        if self.split is None:
            return None
        if self.last_step != step:
            self._evaluate(step)
        return self.last

    def _evaluate(self, step: int) -> None:
        loss, count = val_loss(self.engine, self.split, self.device, self.dtype)
        self.last_step, self.last = step, loss
        best = loss < self.best
        self.metrics.val(step, {"val_loss": loss, "val_tokens": count, "val_records": self.split.records})
        if best and self.keep_best:
            self.best = loss
            out = self.run_dir / BEST_DIR
            checkpoint.export_model(self.engine, out, self.zero_stage)
            if self.main:
                (out / "val.json").write_text(json.dumps({"step": step, "val_loss": loss}) + "\n")
