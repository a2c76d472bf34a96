"""Training data loader: `TrainLoader` wraps the DataLoader over a `PackedStage` (one stage's packed
shards -> model-ready micro-batches, per rank and worker: ovis_model.train.dataset): it runs epoch after
epoch, counts what it hands out, and its `state_dict()` (epoch and micro-batches consumed, plus what the
plan depends on) resumes exactly: a resumed run sees the micro-batches an uninterrupted one would have
seen next. Resumed on another world size or micro-batch budget (elastic), the records every rank of the
interrupted run consumed in the current epoch are left out, and the rest of the epoch is planned over the
new ranks (ovis_model.train.plan.consumed_mask).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ovis_data.lifeline import exit_with

from .dataset import PackedStage
from .plan import consumed_mask
from .wire import SlotRing

STATE_VERSION = 1


class _SameEnvironment:
    """A worker_init_fn giving each worker the environment of the process that started the DataLoader: a
    forkserver's workers would otherwise see the server's, as it was when the first loader started it
    (credentials or endpoints set since, e.g. AWS_* for s3:// data, would be missing). The worker also
    exits with that process (a SIGKILLed trainer leaves no worker behind: ovis_data.lifeline)."""

    def __init__(self, environ: dict[str, str]) -> None:
        self.environ = environ
        self.owner = os.getpid()

    def __call__(self, _worker_id: int) -> None:
        exit_with(self.owner)
        os.environ.clear()
        os.environ.update(self.environ)


class TrainLoader:
    """Epoch after epoch of a rank's micro-batches, with an exact, resumable position.

    Iterate it for micro-batches (dicts with `inputs` for the model, `n_supervised`, `meta`); it never
    ends (the next epoch follows); `micro_batches_per_epoch` says how many an epoch has on every rank.
    """

    def __init__(
        self,
        dataset: PackedStage,
        *,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
        multiprocessing_context: str | None = "forkserver",
    ) -> None:
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.mp_context = multiprocessing_context if self.num_workers > 0 else None
        self.epoch, self.consumed = 0, 0
        self.bad: dict[str, dict] = {}  # shard -> first event, over the run
        self.lost_records = 0
        self.epoch_lost_records = 0  # in the current epoch (the limit train.max_lost_fraction is per epoch)
        self.empty_micro_batches = 0
        self.on_bad: Callable[[dict], None] | None = None  # called with the first event of each bad shard
        self.resumed_change: str | None = None  # what an elastic resume changed, said at the run's start

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.dataset.plan(self.epoch).n_batches

    def epoch_summary(self, epoch: int | None = None) -> dict:
        summary = dict(self.dataset.plan(self.epoch if epoch is None else epoch).summary)
        summary.update(
            bad_shards=sorted(self.bad),
            lost_records=self.lost_records,
            empty_micro_batches=self.empty_micro_batches,
        )
        return summary

    def _dataloader(self) -> DataLoader:
        kwargs: dict[str, Any] = {}
        self.dataset.ring = None
        if self.num_workers > 0:
            # each worker's micro-batches in flight (prefetch_factor) plus the one it is filling
            slots = self.prefetch_factor + 1
            self.dataset.ring = SlotRing(self.num_workers, slots, self.dataset.slot_bytes())
            context = mp.get_context(self.mp_context)
            if self.mp_context == "forkserver":
                # workers fork from a server that imported torch and this module once, not per worker
                context.set_forkserver_preload([__name__])
            kwargs.update(
                prefetch_factor=self.prefetch_factor,
                multiprocessing_context=context,
                worker_init_fn=_SameEnvironment(dict(os.environ)),
            )
        return DataLoader(
            self.dataset,
            batch_size=None,  # the dataset yields whole micro-batches
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            **kwargs,
        )

    def __iter__(self) -> Iterator[dict]:
        self.dataset.set_position(self.epoch, self.consumed)
        n = self.dataset.plan(self.epoch).n_batches
        loader = self._dataloader()
        ring = self.dataset.ring
        for batch in loader:
            if ring is not None:
                batch["inputs"] = ring.take(batch["inputs"], self.pin_memory)
            meta = batch["meta"]
            if (meta["epoch"], meta["step"]) != (self.epoch, self.consumed):
                raise RuntimeError(
                    f"loader out of order: got epoch {meta['epoch']} micro-batch {meta['step']}, "
                    f"expected {self.epoch}/{self.consumed}"
                )
            for event in meta["bad"]:
                if event["shard"] not in self.bad and self.on_bad is not None:
                    self.on_bad(event)
                self.bad.setdefault(event["shard"], event)
            self.lost_records += meta["lost"]
            self.epoch_lost_records += meta["lost"]
            self.empty_micro_batches += int(meta["records"] == 0)
            self.consumed += 1
            if self.consumed == n:  # the stream goes on with the next epoch
                self.epoch, self.consumed, self.epoch_lost_records = self.epoch + 1, 0, 0
                n = self.dataset.plan(self.epoch).n_batches
            yield batch

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _identity(self) -> dict:
        """What the plan depends on and must not change across a resume."""
        d = self.dataset
        return {"seed": d.seed, "window": d.window, "manifest_inputs_sha256": d.manifest.get("inputs_sha256")}

    def _sizes(self) -> dict:
        """What may change across a resume (elastic): the plan of the rest of the epoch is made anew."""
        return {"world_size": self.dataset.world_size, "micro_batch_tokens": self.dataset.micro_batch_tokens}

    def state_dict(self) -> dict:
        """Small and the same on every rank (ranks advance in lockstep): epoch, micro-batches consumed, and
        what the plan depends on (checked on load). After an elastic resume, the records left out of the
        current epoch too (a bit per record of the stage)."""
        d = self.dataset
        excluded = None
        if d.excluded is not None and d.excluded_epoch == self.epoch:
            excluded = torch.from_numpy(np.packbits(d.excluded))
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "plan_digest": d.plan(self.epoch).digest() if d.rank == 0 else None,
            "excluded": excluded,
            "bad_shards": dict(self.bad),
            "lost_records": self.lost_records,
            "epoch_lost_records": self.epoch_lost_records,
            "empty_micro_batches": self.empty_micro_batches,
            **self._identity(),
            **self._sizes(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ValueError(
                    f"cannot resume the loader: {key} was {state.get(key)!r} in the checkpoint, {value!r} now"
                )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        d = self.dataset
        n = d.table.n_records
        excluded = None
        if state.get("excluded") is not None:
            excluded = np.unpackbits(state["excluded"].numpy(), count=n).astype(bool)
        old = {key: int(state[key]) for key in self._sizes()}
        if old == self._sizes():
            d.exclude(self.epoch if excluded is not None else None, excluded)
            digest = state.get("plan_digest")
            if d.rank == 0 and digest not in (None, d.plan(self.epoch).digest()):
                raise ValueError("cannot resume the loader exactly: the epoch plan is not the checkpoint's")
        else:
            self._resume_elsewhere(old, excluded)
        self.bad = dict(state.get("bad_shards", {}))
        self.lost_records = int(state.get("lost_records", 0))
        self.epoch_lost_records = int(state.get("epoch_lost_records", 0))
        self.empty_micro_batches = int(state.get("empty_micro_batches", 0))

    def _resume_elsewhere(self, old: dict, excluded: np.ndarray | None) -> None:
        """Elastic resume: the records the old ranks consumed in this epoch are left out of its plan for
        the new ranks; an epoch with too little left for a micro-batch per rank ends (its rest dropped)."""
        d = self.dataset
        mask = consumed_mask(
            d.table,
            seed=d.seed,
            epoch=self.epoch,
            world_size=old["world_size"],
            micro_batch_tokens=old["micro_batch_tokens"],
            window=d.window,
            excluded=excluded,
            consumed=self.consumed,
        )
        d.exclude(self.epoch, mask)
        self.consumed = 0
        plan = d.plan(self.epoch)
        left = d.table.n_records - int(mask.sum())
        self.resumed_change = (
            f"elastic resume: world size {old['world_size']} -> {d.world_size}, micro-batch budget "
            f"{old['micro_batch_tokens']} -> {d.micro_batch_tokens} tokens; epoch {self.epoch}: "
            f"{left:,} of {d.table.n_records:,} records left, {plan.n_batches} micro-batch(es) per rank, "
            f"{plan.summary['dropped_records']} record(s) dropped for equal counts per rank"
        )
        if plan.n_batches == 0:  # too little left: the next epoch, planned for the new size
            self.epoch += 1
            d.exclude(None, None)
