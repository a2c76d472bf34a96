"""A held-out split (`pack --holdout`) and what training reports about it: the split is disjoint from
training and deterministic; `ovis-train` logs `val_loss` (equal to a direct computation over the split
with the exported model), keeps the best model, and logs tokens/s and MFU on every step."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import train_here
from test_train import FAST_IN_PROCESS, REPO, free_port, model_weights, run_losses, train_env

from ovis_data.pack.holdout import holdout_draws
from ovis_data.pack.stage import pack_stage
from ovis_data.shards import read_records
from ovis_model.batching import collate_packed
from ovis_model.modeling import Ovis
from ovis_model.preprocess import decode_rgb

HOLDOUT = 0.25


@pytest.fixture(scope="module")
def held_out(demo_root: Path, parts: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stage 1 packed for the tiny model (conftest.parts), a quarter of each dataset held out (stage1/val)."""
    root = tmp_path_factory.mktemp("valroot") / "data"
    shutil.copytree(demo_root, root)
    out = tmp_path_factory.mktemp("packed")
    settings = dict(processes=1, packs_per_shard=3, visual_tokens=6, image_size=28, max_length=256)
    pack_stage(1, root, parts[0], out, holdout=HOLDOUT, **settings)
    return out


def _sample_ids(stage_dir: Path) -> list[tuple[str, str]]:
    ids = []
    for tar in sorted(stage_dir.glob("*.tar")):
        for rec in read_records(tar):
            ids += [(s["dataset"], s["id"]) for s in rec.meta["samples"]]
    return ids


def test_the_val_split_is_disjoint_and_deterministic(
    held_out: Path, parts, demo_root, tmp_path: Path
) -> None:
    stage = held_out / "stage1"
    train, val = _sample_ids(stage), _sample_ids(stage / "val")
    manifest = json.loads((stage / "manifest.json").read_text())
    vman = json.loads((stage / "val" / "manifest.json").read_text())
    assert val and not set(train) & set(val)
    assert vman["split"] == "val" and vman["samples"] == len(val) == len(set(val))
    assert vman["inputs_sha256"] == manifest["inputs_sha256"]
    for name, d in manifest["datasets"].items():
        assert d["held_out"] == vman["datasets"][name]["selected"]
        # weight 1: every selected sample is on exactly one side
        assert d["selected"] + d["held_out"] == d["catalog"]
        # which ones: the hash of (seed, dataset, id) below the fraction, nothing else
        ids = [i for n, i in val if n == name]
        assert (holdout_draws(pa.array(ids), name, 0, np.zeros(len(ids))) < HOLDOUT).all()
    assert 0.1 < len(val) / (len(val) + len(train)) < 0.4
    # the same inputs give the same bytes, another seed another split
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    settings = dict(processes=1, packs_per_shard=3, visual_tokens=6, image_size=28, max_length=256)
    pack_stage(1, root, parts[0], tmp_path / "again", holdout=HOLDOUT, **settings)
    for tar in sorted((stage / "val").glob("*.tar")):
        assert tar.read_bytes() == (tmp_path / "again" / "stage1" / "val" / tar.name).read_bytes()
    pack_stage(1, root, parts[0], tmp_path / "seed1", holdout=HOLDOUT, seed=1, **settings)
    assert set(_sample_ids(tmp_path / "seed1" / "stage1" / "val")) != set(val)


def _direct_val_loss(model_dir: Path, val_dir: Path) -> float:
    """Sum of the supervised tokens' cross-entropy over every val record, one record at a time."""
    model = Ovis.from_pretrained(model_dir).eval()
    total = count = 0.0
    with torch.no_grad():
        for tar in sorted(val_dir.glob("*.tar")):
            for rec in read_records(tar):
                part = {
                    "input_ids": rec.input_ids,
                    "labels": rec.labels,
                    "lengths": rec.lengths,
                    "images": [decode_rgb(b) for b in rec.images],
                }
                batch = collate_packed([part], model.image_processor, model.num_visual_tokens)
                out = model(**batch)
                total += float(out.loss_sum)
                count += float(out.n_tokens)
    return total / count


def test_training_logs_val_loss_keeps_the_best_and_reports_mfu(held_out: Path, parts, tmp_path: Path) -> None:
    llm, vit = parts
    p = train_here(
        "--stage", "1", "--data", str(held_out), "--out", str(tmp_path), "--llm", str(llm), "--vit", str(vit),
        "--max-steps", "4", "--set", "train.eval_every=2", "--set", "train.keep_best=true",
        "--set", "train.peak_tflops=0.5", "--set", 'trainable=["all"]', *FAST_IN_PROCESS,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = tmp_path / "stage1"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4
    assert all(r["step_tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["tflops_per_rank"] > 0 for r in steps)
    vals = [r for r in records if r.get("event") == "val"]
    assert [r["step"] for r in vals] == [2, 4]  # the end (step 4) is not evaluated twice
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_loss"] == vals[-1]["val_loss"]
    direct = _direct_val_loss(run / "model", held_out / "stage1" / "val")
    assert vals[-1]["val_loss"] == pytest.approx(direct, rel=1e-5)
    best = json.loads((run / "model_best" / "val.json").read_text())
    assert best["val_loss"] == min(r["val_loss"] for r in vals)
    assert _direct_val_loss(run / "model_best", held_out / "stage1" / "val") == pytest.approx(
        best["val_loss"], rel=1e-5
    )
    assert list((run / "tensorboard").glob("events.*"))
    assert "val_loss" in p.stderr


def test_a_run_without_a_val_split_says_so_once(held_out: Path, parts, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(held_out / "stage1", data / "stage1", ignore=shutil.ignore_patterns("val"))
    llm, vit = parts
    p = train_here(
        "--stage", "1", "--data", str(data), "--out", str(tmp_path / "run"), "--llm", str(llm),
        "--vit", str(vit), "--max-steps", "2", "--set", "train.eval_every=1", *FAST_IN_PROCESS,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (p.stdout + p.stderr).count("no validation split") == 1
    lines = (tmp_path / "run" / "stage1" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert not [r for r in records if r.get("event") == "val"]
    assert json.loads((tmp_path / "run" / "stage1" / "summary.json").read_text())["val_loss"] is None


def test_two_ranks_zero3_train_and_their_val_loss_covers_the_whole_split(
    held_out: Path, parts, tmp_path: Path
) -> None:
    """`ovis-train` on two ranks (torchrun, gloo) under ZeRO-3 trains every step and saves the gathered
    weights; each rank evaluates its share of the val split (one rank gets an empty micro-batch when the
    count is odd) and the sum over ranks equals the loss of the whole split computed directly."""
    llm, vit = parts
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "ovis_model.train",
           "--stage", "1", "--data", str(held_out), "--out", str(tmp_path), "--llm", str(llm),
           "--vit", str(vit), "--max-steps", "2", "--set", "deepspeed=zero3.json",
           "--set", 'trainable=["all"]', "--micro-batch-tokens", "300", *FAST_IN_PROCESS[:-2]]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=train_env(), timeout=400, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "stage1"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 2 and config["deepspeed"]["zero_optimization"]["stage"] == 3
    losses = run_losses(run_dir)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    weights, llm0 = model_weights(run_dir / "model"), model_weights(llm)
    assert all(w.numel() > 0 for w in weights.values())  # ZeRO-3's partitions gathered
    assert any(not torch.equal(weights[k], llm0[k[4:]]) for k in weights if k.startswith("llm."))
    summary = json.loads((run_dir / "summary.json").read_text())
    direct = _direct_val_loss(run_dir / "model", held_out / "stage1" / "val")
    assert summary["val_loss"] == pytest.approx(direct, rel=1e-5)


def test_pack_command_holdout(held_out: Path, parts, demo_root: Path, tmp_path: Path) -> None:
    from conftest import run_cli

    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    common = ["pack", "--stage", "1", "--root", str(root), "--tokenizer", str(parts[0]), "--processes", "1",
              "--packs-per-shard", "3", "--visual-tokens", "6", "--image-size", "28",
              "--max-length", "256"]  # fmt: skip
    bad = run_cli(*common, "--out", str(tmp_path / "bad"), "--holdout", "1.5")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --holdout must be a fraction in [0, 1), got 1.5"
    ]
    ok = run_cli(*common, "--out", str(tmp_path / "out"), "--holdout", str(HOLDOUT))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    held = json.loads((held_out / "stage1" / "val" / "manifest.json").read_text())["samples"]
    assert f"{held} samples held out for validation" in ok.stdout.replace("\n", " ")
    for tar in sorted((held_out / "stage1" / "val").glob("*.tar")):  # the library's and the command's bytes
        assert tar.read_bytes() == (tmp_path / "out" / "stage1" / "val" / tar.name).read_bytes()
