"""Elastic resume: a run stopped by SIGTERM resumes on another number of ranks (torchrun, gloo, ZeRO-2 on
CPU) and another micro-batch budget. `train.log_samples` says which samples each rank consumed at each step:
over the interrupted epoch no sample is seen twice and none is missing beyond the drops the resumed run
reports; the loss goes on where it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import train_here
from test_train import FAST, FAST_IN_PROCESS, free_port, run_losses, train_env

from ovis_data.shards import iter_records
from ovis_model.train.elastic import ElasticError, check_zero3_world

REPO = Path(__file__).resolve().parents[1]
STEPS = "40"  # never reached: the epoch under test ends first; the same in every run (the LR schedule)


def _all_sample_keys(stage_dir: Path) -> set[str]:
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    keys = set()
    for shard in manifest["shards"]:
        for _, rec in iter_records(stage_dir / shard["name"]):
            keys.update(f"{shard['name']}/{rec.key}#{j}" for j in range(len(rec.lengths)))
    return keys


def _samples(run_dir: Path, epoch: int) -> list[str]:
    lines = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return [k for r in lines if r["epoch"] == epoch for k in r["samples"]]


def _command(
    world: int,
    packed: Path,
    parts: tuple[Path, Path],
    out: Path,
    *extra: str,
    fast: list[str] = FAST,
) -> list[str]:
    train = [
        "-m", "ovis_model.train", "--stage", "1", "--data", str(packed), "--out", str(out),
        "--llm", str(parts[0]), "--vit", str(parts[1]), "--max-steps", STEPS,
        "--set", "train.log_samples=true", "--set", "train.save_every=1000",
        "--set", "train.schedule=constant",
        *fast, "--micro-batch-tokens", "256", *extra,
    ]  # fmt: skip
    if world == 1:
        return [sys.executable, *train]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    return [torchrun, "--nproc_per_node", str(world), "--master_port", str(free_port()), *train]


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run_until(cmd: list[str], run_dir: Path, done) -> str:  # noqa: ANN001 - done: records -> bool
    """Run `cmd`, SIGTERM its ranks (as a preempting scheduler does) once `done(metrics records)`; stdout."""
    pipe = subprocess.PIPE
    proc = subprocess.Popen(cmd, stdout=pipe, stderr=pipe, text=True, env=train_env(), cwd=REPO)
    deadline = time.time() + 900
    try:
        while time.time() < deadline and proc.poll() is None:
            if (run_dir / "metrics.jsonl").exists() and done(_events(run_dir)):
                for pid in _ranks(proc.pid, cmd):
                    os.kill(pid, signal.SIGTERM)
                break
            time.sleep(0.1)
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "stopped by SIGTERM" in out, out[-3000:]
    return out


def _ranks(pid: int, cmd: list[str]) -> list[int]:
    """The trainer processes: `pid` itself, or torchrun's children (a SIGTERM to torchrun makes it exit 1)."""
    if "torchrun" not in Path(cmd[0]).name:
        return [pid]
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _steps(n: int):  # noqa: ANN202
    return lambda records: sum("loss" in r for r in records) >= n


def _epoch_ended(records: list[dict]) -> bool:
    return any(r.get("event") == "epoch_end" for r in records)


def _check_epoch(run_dir: Path, packed: Path, stopped_at: int, resumed: str) -> None:
    said = re.search(r"elastic resume: .* (\d+) record\(s\) dropped", resumed)
    assert said, resumed[-3000:]
    seen = _samples(run_dir, epoch=0)
    assert len(seen) == len(set(seen)), "a sample seen twice in the epoch"
    everything = _all_sample_keys(packed / "stage1")
    missing = everything - set(seen)
    assert set(seen) <= everything
    # what the resumed plan dropped (equal counts per rank) is all that is missing; the interrupted run's
    # own plan drops are not lost: they are among the records left for the new ranks
    records_missing = {k.rsplit("#", 1)[0] for k in missing}
    assert len(records_missing) == int(said.group(1)), (len(records_missing), said.group(0))
    losses = run_losses(run_dir)
    before = [losses[s] for s in sorted(losses) if s <= stopped_at]
    after = [losses[s] for s in sorted(losses) if s > stopped_at]
    assert after, "the resumed run made no step"
    # no jump: the step across the resume moves the loss no more than the run's steps move it elsewhere
    noise = max(abs(a - b) for run in (before, after) for a, b in zip(run, run[1:], strict=False))
    assert abs(after[0] - before[-1]) <= 1.5 * noise, (before, after)


def _stop_then_resume(
    packed: Path,
    model_parts: tuple[Path, Path],
    out: Path,
    first: tuple,
    second: tuple,
    steps: int,
    fast: list[str] = FAST,
) -> None:
    """Run `first` (world, extra args) for `steps` steps, resume as `second` until epoch 0 ends; check."""
    run_dir = out / "stage1"
    _run_until(_command(first[0], packed, model_parts, out, *first[1:], fast=fast), run_dir, _steps(steps))
    stopped_at = max(run_losses(run_dir))
    assert not _epoch_ended(_events(run_dir)), "the first run finished the epoch: stop it earlier"
    ranks = {json.loads(line)["rank"] for line in (run_dir / "samples.jsonl").read_text().splitlines()}
    assert ranks == set(range(first[0]))
    ckpt = run_dir / "checkpoints" / f"step{stopped_at}"
    assert len(list(ckpt.glob("*optim_states.pt"))) == first[0]  # ZeRO-2: partitions to re-cut
    again = _command(second[0], packed, model_parts, out, *second[1:], "--resume", fast=fast)
    resumed = _run_until(again, run_dir, _epoch_ended)
    assert f"world size {first[0]} -> {second[0]}" in resumed, resumed[-3000:]
    _check_epoch(run_dir, packed, stopped_at, resumed)


def test_two_ranks_resume_on_one(packed: Path, parts: tuple[Path, Path], tmp_path: Path) -> None:
    """With a loader worker on each rank: batches it read ahead but the trainer never took are not seen."""
    _stop_then_resume(packed, parts, tmp_path, (2,), (1,), steps=3)


def test_one_rank_resume_on_two_with_another_budget(
    packed: Path,
    parts: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """Batches read in each rank's own process (read-ahead by workers: the test above)."""
    budget = ("--micro-batch-tokens", "512")
    _stop_then_resume(packed, parts, tmp_path, (1,), (2, *budget), steps=3, fast=FAST_IN_PROCESS)


def test_zero3_on_another_size_is_refused_in_one_line(
    packed: Path,
    parts: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    zero3 = ("--set", "deepspeed=zero3.json", "--set", 'trainable=["all"]', "--max-steps", "2")
    # the one-rank run in this process (its checkpoint is what matters), the refused resume on two real ranks
    one_rank = _command(1, packed, parts, tmp_path, *zero3, fast=FAST_IN_PROCESS)
    first = train_here(*one_rank[3:])  # the arguments after `python -m ovis_model.train`
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    again = _command(2, packed, parts, tmp_path, *zero3, "--resume")
    resumed = subprocess.run(again, capture_output=True, text=True, env=train_env(), timeout=900, cwd=REPO)
    assert resumed.returncode != 0
    errors = {line for line in resumed.stderr.splitlines() if line.startswith("error:")}
    assert len(errors) == 1, resumed.stderr[-3000:]  # the same line from each rank
    assert "written by 1 rank(s) under ZeRO-3, resuming on 2" in errors.pop()
    assert f'File "{REPO / "ovis_model"}' not in resumed.stderr  # no rank traceback (torchrun has its own)


def test_zero3_checkpoints_all_from_another_size_are_refused_before_anything_loads(tmp_path: Path) -> None:
    """The check `ovis-train --resume` makes before the model loads, on checkpoint folders as DeepSpeed
    names their files: refused only when no checkpoint was written by this many ranks (a mixed folder is
    left to the check at load time, on the checkpoint the resume chooses)."""

    def checkpoint(step: int, ranks: int) -> None:
        folder = tmp_path / "checkpoints" / f"step{step}"
        folder.mkdir(parents=True)
        for rank in range(ranks):
            (folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")

    checkpoint(1, ranks=1)
    checkpoint(2, ranks=1)
    with pytest.raises(ElasticError, match=r"step2: written by 1 rank\(s\) under ZeRO-3, resuming on 2"):
        check_zero3_world(tmp_path / "checkpoints", world=2)
    check_zero3_world(tmp_path / "checkpoints", world=1)
    checkpoint(3, ranks=2)  # a later checkpoint from two ranks: resumable on two
    check_zero3_world(tmp_path / "checkpoints", world=2)
    (tmp_path / "zero0" / "step1").mkdir(parents=True)  # ZeRO-0: no optimizer partitions, any size
    check_zero3_world(tmp_path / "zero0", world=2)
