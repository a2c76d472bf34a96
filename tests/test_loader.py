"""The training loader on real tar shards: rank x worker splits, equal counts, budgets, resume, bad shards."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ovis_data.shardformat import Record
from ovis_data.shards import ShardWriter
from ovis_model.batching import batch_to
from ovis_model.preprocess import OvisImageProcessor
from ovis_model.tiny import random_packed_record
from ovis_model.train.dataset import PackedStage
from ovis_model.train.loader import TrainLoader
from ovis_model.train.wire import SHARED, SLOT, SlotRing

VISUAL_TOKENS = 6
CAPACITY = 96
PROCESSOR = OvisImageProcessor(image_size=28)
SHARD_RECORDS = (7, 5, 9, 4, 6, 8)


def _jpeg(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def targets_by_hand(ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> int:
    """Supervised next-token targets, one position at a time: a labelled text token that is not the first
    of its sub-sample (nothing before it there predicts it)."""
    n = start = 0
    for length in lengths.tolist():
        n += sum(1 for t in range(start + 1, start + length) if labels[t] != -100 and ids[t] != -200)
        start += length
    return n


def write_stage(out: Path, seed: int = 0) -> Path:
    """A packed stage written with the pack stage's ShardWriter, and the manifest fields the loader reads."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    shards = []
    for s, n in enumerate(SHARD_RECORDS):
        writer = ShardWriter(out / f"stage3-{s:05d}.tar")
        tokens, supervised = [], []
        for p in range(n):
            while True:  # records of 1-3 sub-samples that fit the capacity once images are expanded
                specs = [
                    (int(rng.integers(4, 20)), int(rng.integers(0, 3))) for _ in range(rng.integers(1, 4))
                ]
                if sum(t + k * VISUAL_TOKENS for t, k in specs) <= CAPACITY:
                    break
            rec = random_packed_record(rng, specs)
            tokens.append(len(rec["input_ids"]) + (VISUAL_TOKENS - 1) * len(rec["images"]))
            supervised.append(targets_by_hand(rec["input_ids"], rec["labels"], rec["lengths"]))
            writer.write(
                Record(
                    key=f"{s:05d}_{p:05d}",
                    input_ids=rec["input_ids"],
                    labels=rec["labels"],
                    lengths=rec["lengths"],
                    images=[_jpeg(im) for im in rec["images"]],
                    meta={"tokens": tokens[-1]},
                )
            )
        writer.close()
        shards.append(
            {
                "name": f"stage3-{s:05d}.tar",
                "records": n,
                "record_tokens": tokens,
                "record_supervised": supervised,
            }
        )
    manifest = {
        "format": "ovis-packed-v1",
        "stage": 3,
        "capacity": CAPACITY,
        "visual_tokens_per_image": VISUAL_TOKENS,
        "image_size": 28,
        "inputs_sha256": "test",
        "shards": shards,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_stage(tmp_path_factory.mktemp("loader") / "stage3")


def _loader(
    data_dir: Path, rank: int, world: int = 2, workers: int = 2, budget: int = 200, **kw
) -> TrainLoader:
    ds = PackedStage(
        data_dir,
        micro_batch_tokens=budget,
        image_processor=PROCESSOR,
        num_visual_tokens=VISUAL_TOKENS,
        seed=3,
        rank=rank,
        world_size=world,
        window=8,
        **kw,
    )
    return TrainLoader(ds, num_workers=workers)


def _fingerprint(batch: dict) -> str:
    h = hashlib.sha256()
    inputs = batch["inputs"]
    for key in ("input_ids", "labels", "position_ids"):
        h.update(inputs[key].numpy().tobytes())
    if inputs["pixel_values"] is not None:
        h.update(inputs["pixel_values"].numpy().tobytes())
    h.update(json.dumps(batch["meta"]["keys"]).encode())
    return h.hexdigest()


def test_ranks_and_workers_cover_the_epoch_disjointly_with_equal_counts(stage_dir: Path) -> None:
    total = sum(SHARD_RECORDS)
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    by_key = {  # each record's supervised targets, counted by hand when the stage was written
        f"{shard['name']}/{s:05d}_{p:05d}": n
        for s, shard in enumerate(manifest["shards"])
        for p, n in enumerate(shard["record_supervised"])
    }
    seen: dict[int, list[str]] = {}
    counts = {}
    for rank in (0, 1):
        loader = _loader(stage_dir, rank)
        n = loader.micro_batches_per_epoch
        batches = list(itertools.islice(loader, n))
        assert [b["meta"]["step"] for b in batches] == list(range(n))
        assert {b["meta"]["epoch"] for b in batches} == {0}
        seen[rank] = [k for b in batches for k in b["meta"]["keys"]]
        counts[rank] = n
        summary = loader.epoch_summary(0)
        assert summary["records"] == len(seen[rank])
        for b in batches:
            meta, inputs = b["meta"], b["inputs"]
            assert 0 < meta["tokens"] <= 200  # the budget, images expanded
            assert meta["computed"] == meta["tokens"]  # concatenated layout: no padding computed
            assert inputs["input_ids"].shape == (1, meta["tokens"])
            assert b["n_supervised"] == sum(by_key[k] for k in meta["keys"])
            if meta["images"]:
                assert inputs["pixel_values"].shape == (meta["images"], 28, 28, 3)  # canvases, channels last
                assert inputs["pixel_values"].dtype == torch.uint8  # normalised on the device
                ready = batch_to(inputs, "cpu", None, PROCESSOR)
                assert ready["pixel_values"].dtype == torch.float32 and "image_sizes" not in ready
        dropped = summary["dropped_records_rank_split"] + summary["dropped_records_equal_batches"]
        assert len(seen[rank]) + summary["dropped_records_equal_batches"] == total // 2
        assert dropped < 10
    assert counts[0] == counts[1] > 3
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0])) == len(seen[0])
    # the plan does not depend on the number of workers: one worker gives the same batches in order
    solo = _loader(stage_dir, 0, workers=0)
    two = _loader(stage_dir, 0, workers=2)
    n = counts[0]
    assert [_fingerprint(b) for b in itertools.islice(solo, n)] == [
        _fingerprint(b) for b in itertools.islice(two, n)
    ]


def test_exact_resume_mid_epoch_two_ranks_two_workers(stage_dir: Path) -> None:
    for rank in (0, 1):
        straight = _loader(stage_dir, rank)
        n = straight.micro_batches_per_epoch
        expected = [_fingerprint(b) for b in itertools.islice(straight, n + 3)]  # into the next epoch
        first = _loader(stage_dir, rank)
        head = [_fingerprint(b) for b in itertools.islice(first, 3)]  # stop after 3 (odd: worker 1 next)
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        resumed = _loader(stage_dir, rank)
        resumed.load_state_dict(state)
        tail = [_fingerprint(b) for b in itertools.islice(resumed, n)]
        assert head + tail == expected
        # a different epoch order: epoch 1 is not epoch 0 again
        assert expected[n:] != expected[:3]


def test_resume_on_other_world_sizes_and_budgets_sees_each_record_once(stage_dir: Path) -> None:
    """2 ranks take 1 micro-batch each; the epoch goes on over 3 ranks at another budget, which take 1
    each; then over 1 rank, which finishes it: every record once, none missing (1 rank drops none)."""

    def keys(loader: TrainLoader, n: int) -> list[str]:
        batches = list(itertools.islice(loader, n))
        assert all(b["meta"]["epoch"] == 0 for b in batches)
        return [k for b in batches for k in b["meta"]["keys"]]

    two = [_loader(stage_dir, r, workers=0) for r in (0, 1)]
    seen = [k for loader in two for k in keys(loader, 1)]
    state = json.loads(json.dumps(two[0].state_dict()))  # what a checkpoint stores (the same on every rank)
    three = [_loader(stage_dir, r, world=3, workers=0, budget=120) for r in range(3)]
    for loader in three:
        loader.load_state_dict(state)
        assert loader.resumed_change.startswith(
            "elastic resume: world size 2 -> 3, micro-batch budget 200 -> 120"
        )
        assert loader.micro_batches_per_epoch >= 2
    # the rest of the epoch: planned over the 3 ranks, or dropped for equal counts (counted)
    planned = sum(loader.epoch_summary(0)["records"] for loader in three)
    assert planned + three[0].epoch_summary(0)["dropped_records"] == _n_records(stage_dir) - len(seen)
    for loader in three:
        seen += keys(loader, 1)
    one = _loader(stage_dir, 0, world=1, workers=1)
    one.load_state_dict(three[0].state_dict())  # with the records the 2 ranks consumed, carried along
    assert "0 record(s) dropped" in one.resumed_change
    assert one.epoch_summary(0)["consumed_before_resume"] == len(seen)
    seen += keys(one, one.micro_batches_per_epoch)
    assert len(seen) == len(set(seen))  # no record twice in the epoch
    assert len(seen) == _n_records(stage_dir)  # none missing, also none of the 3 ranks' drops
    assert one.epoch == 1  # and the next epoch follows the plan for one rank


def _n_records(stage_dir: Path) -> int:
    return _loader(stage_dir, 0, world=1, workers=0).dataset.table.n_records


def test_resume_refuses_another_seed(stage_dir: Path) -> None:
    state = _loader(stage_dir, 0).state_dict()
    state["seed"] = 4
    with pytest.raises(ValueError, match="seed was 4 in the checkpoint, 3 now"):
        _loader(stage_dir, 0).load_state_dict(state)


def test_budget_below_capacity_is_refused(stage_dir: Path) -> None:
    with pytest.raises(ValueError, match="smaller than a packed record"):
        _loader(stage_dir, 0, budget=20)


def test_corrupt_shard_is_named_and_skipped_with_the_flag(stage_dir: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "stage3"
    shutil.copytree(stage_dir, broken)
    victim = broken / "stage3-00002.tar"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated mid-shard
    loader = _loader(broken, 0, world=1, workers=2)
    n = loader.micro_batches_per_epoch
    with pytest.raises(Exception, match=r"stage3-00002\.tar: record \d+"):
        list(itertools.islice(loader, n))

    total_lost = 0
    for rank in (0, 1):
        skipping = _loader(broken, rank, skip_bad_shards=True)
        n = skipping.micro_batches_per_epoch
        batches = list(itertools.islice(skipping, n))
        assert len(batches) == n  # counts stay equal: the other rank never waits
        keys = [k for b in batches for k in b["meta"]["keys"]]
        lost = sum(b["meta"]["lost"] for b in batches)
        summary = skipping.epoch_summary(0)
        assert summary["lost_records"] == lost
        assert len(keys) + lost == summary["records"]
        assert summary["bad_shards"] == (["stage3-00002.tar"] if lost else [])
        total_lost += lost
    assert total_lost > 0


def test_undecodable_image_names_its_record_and_is_dropped_with_the_flag(
    stage_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from ovis_data.shards import read_records

    broken = tmp_path / "stage3"
    shutil.copytree(stage_dir, broken)
    victim = broken / "stage3-00003.tar"
    records = list(read_records(victim))
    index = next(i for i, r in enumerate(records) if r.images)
    records[index].images[0] = b"\xff\xd8 not a jpeg"
    writer = ShardWriter(victim)  # same records, one image damaged: the manifest still fits
    for rec in records:
        writer.write(rec)
    writer.close()
    strict = _loader(broken, 0, world=1, workers=0)
    with pytest.raises(
        Exception, match=rf"stage3-00003\.tar: record {index}: image img_000 cannot be decoded"
    ):
        list(itertools.islice(strict, strict.micro_batches_per_epoch))
    lenient = _loader(broken, 0, world=1, workers=0, skip_bad_shards=True)
    batches = list(itertools.islice(lenient, lenient.micro_batches_per_epoch))
    keys = [k for b in batches for k in b["meta"]["keys"]]
    assert f"stage3-00003.tar/{records[index].key}" not in keys
    assert sum(b["meta"]["lost"] for b in batches) == 1
    assert len(keys) == lenient.epoch_summary(0)["records"] - 1
    assert lenient.epoch_summary(0)["bad_shards"] == ["stage3-00003.tar"]


def test_shards_read_alike_through_the_header_walk_and_tarfile(stage_dir: Path, tmp_path: Path) -> None:
    """Plain ustar shards take the fast header walk; a tar with a GNU long name falls back to tarfile
    mid-way and yields the same records, none twice."""
    import io
    import tarfile

    from ovis_data.shards import iter_records

    src = stage_dir / "stage3-00000.tar"
    plain = list(iter_records(src))
    gnu = tmp_path / "gnu.tar"
    with tarfile.open(src) as tin, tarfile.open(gnu, "w", format=tarfile.GNU_FORMAT) as tout:
        members = [(m, tin.extractfile(m).read()) for m in tin]
        keys_in_order = [m.name.partition(".")[0] for m, _ in members]
        middle = keys_in_order.index(keys_in_order[len(members) // 2])  # a record's first member
        for i, (m, data) in enumerate(members):
            if i == middle:  # a long-named record in the middle: the walk meets it mid-file
                long = tarfile.TarInfo("x" * 120 + ".json")
                long.size = 2
                tout.addfile(long, io.BytesIO(b"{}"))
            tout.addfile(m, io.BytesIO(data))
    mixed = [(i, r.key) for i, r in iter_records(gnu)]
    keys = [r.key for _, r in plain]
    assert [k for _, k in mixed if k != "x" * 120] == keys
    assert [i for i, _ in mixed] == list(range(len(keys) + 1))


def test_slot_ring_hands_over_exact_tensors_and_frees_its_slots() -> None:
    """The worker -> main hand-over (wire.py) on real shared memory, in one process: a micro-batch that
    fits goes through a reused slot, one too large through a fresh segment; the tensors come back equal."""
    ring = SlotRing(workers=2, slots=2, nbytes=4096)
    small = {
        "input_ids": torch.arange(100, dtype=torch.long)[None],
        "pixel_values": torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8),
        "cu_seqlens": torch.tensor([0, 60, 100], dtype=torch.int32),
        "max_seqlen": 60,
    }
    big = {**small, "pixel_values": torch.zeros(4, 28, 28, 3, dtype=torch.uint8)}
    for round_ in range(3):  # slots are reused: worker 1 cycles through both, twice over
        message = ring.put(1, small)
        assert SLOT in message and "input_ids" not in message
        assert ring.busy[1].sum() == 1
        got = ring.take(message)
        assert ring.busy.sum() == 0, round_
        assert got["max_seqlen"] == 60 and set(got) == set(small)
        for key in ("input_ids", "pixel_values", "cu_seqlens"):
            assert got[key].dtype == small[key].dtype and torch.equal(got[key], small[key])
        small["input_ids"] = small["input_ids"] + 1  # a slot's old contents never come back
    message = ring.put(0, big)
    assert SHARED in message and ring.busy.sum() == 0
    assert torch.equal(ring.take(message)["pixel_values"], big["pixel_values"])
