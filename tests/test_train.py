"""`ovis-train` as users run it: real processes, real DeepSpeed on CPU, real packed shards of the demo corpus.

Stage chaining 1 -> 2 -> 3 with the recipes' freezing checked on the saved weights, exact resume after
SIGTERM, 2 ranks (torchrun, gloo) at ZeRO-2 (at ZeRO-3: test_validation), and each bad input refused before
compute.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import RANK_VARIABLES, call, one_line_error, train_here
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
# CPU-sized settings: a tiny model, a small global batch so that the demo corpus gives several steps
FAST = [
    "--set", "model.visual_vocab_size=64",
    "--set", "train.global_batch_samples=8",
    "--set", "train.gradient_checkpointing=false",
    "--set", "train.num_workers=1",
    "--set", "train.lr=0.003",
    "--set", "train.lr_by_family={}",
    "--micro-batch-tokens", "1024",
]  # fmt: skip
# FAST with the batches read in the trainer's own process, for runs whose claim is not about the loader's
# workers (each worker is a fresh Python importing torch, per run and rank): the two-rank runs here are
# about ranks and ZeRO; the SIGTERM/SIGKILL and resume runs here and in test_train_faults and one elastic
# run in test_elastic (two ranks resumed on one) keep one, test_loader tests them
FAST_IN_PROCESS = ["train.num_workers=0" if a == "train.num_workers=1" else a for a in FAST]


def train_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for key in RANK_VARIABLES:
        env.pop(key, None)
    return env


def ovis_train(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ovis_model.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=train_env(), timeout=timeout, cwd=REPO)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run_losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


STAGE1_STEPS = 9  # stage 1's data is 8 steps an epoch, so the run crosses into a second one


@pytest.fixture(scope="module")
def stage1_run(packed: Path, parts: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted stage-1 run (read-only; in this process, on one thread as the SIGTERM test's
    processes): the chain's first stage and the SIGTERM test's reference (the cosine schedule's length is
    --max-steps, so both use the same)."""
    llm_dir, vit_dir = parts
    run = tmp_path_factory.mktemp("stage1_run") / "run"
    p1 = train_here("--stage", "1", "--data", str(packed), "--out", str(run), "--llm", str(llm_dir),
                    "--vit", str(vit_dir), "--max-steps", str(STAGE1_STEPS), *FAST)  # fmt: skip
    assert p1.returncode == 0, p1.stdout[-3000:] + p1.stderr[-3000:]
    assert "freeze llm" in p1.stdout and "train  vte" in p1.stdout
    return run


def test_stages_chain_with_the_recipes_freezing(
    stage1_run: Path, packed: Path, parts: tuple[Path, Path], tmp_path: Path
) -> None:
    llm_dir, vit_dir = parts
    run = tmp_path / "run"
    shutil.copytree(stage1_run / "stage1", run / "stage1")  # stages 2 and 3 write beside it
    for stage in (2, 3):
        p = train_here(
            "--stage", str(stage), "--data", str(packed), "--out", str(run), "--max-steps", "3",
            *FAST_IN_PROCESS,
        )  # fmt: skip
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    llm0 = model_weights(llm_dir)
    vit0 = model_weights(vit_dir)
    w1, w2, w3 = (model_weights(run / f"stage{s}" / "model") for s in (1, 2, 3))
    llm_keys = [k for k in w1 if k.startswith("llm.")]
    assert llm_keys
    # stage 1: the LLM and every ViT block but the re-initialised last one stay as loaded
    for k in llm_keys:
        assert torch.equal(w1[k], llm0[k[len("llm.") :]]), k
    frozen_vit = [k for k in w1 if k.startswith("visual_tokenizer.backbone.") and ".layers.1." not in k]
    frozen_vit = [k for k in frozen_vit if "post_layernorm" not in k]
    assert frozen_vit
    for k in frozen_vit:
        assert torch.equal(w1[k], vit0[k[len("visual_tokenizer.backbone.") :]]), k
    trained1 = [k for k in w1 if k.startswith(("vte.", "visual_tokenizer.head."))]
    assert any(not torch.equal(w1[k], w2[k]) for k in trained1)  # stage 2 trains them further
    # stage 2: the LLM is frozen; stage 3 trains it
    for k in llm_keys:
        assert torch.equal(w2[k], w1[k]), k
    assert any(not torch.equal(w3[k], w2[k]) for k in llm_keys)
    for stage in (1, 2, 3):
        run_dir = run / f"stage{stage}"
        losses = run_losses(run_dir)
        assert len(losses) >= 3 and all(math.isfinite(v) for v in losses.values())  # one per step
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
        # one epoch convention: a step line says the epoch (from 0) its micro-batches came from, and an
        # epoch_end event follows the last step of that epoch
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records if "loss" in r][0] == 0
        ends = [i for i, r in enumerate(records) if r.get("event") == "epoch_end"]
        assert ends or stage > 1, "stage 1's 9 steps cross an epoch"
        for i in ends:
            assert [r for r in records[:i] if "loss" in r][-1]["epoch"] == records[i]["epoch"]
        assert (
            json.loads((run_dir / "config.json").read_text())["deepspeed"]["gradient_accumulation_steps"] >= 1
        )
    # the final model answers a question (the next stage and ovis-chat load it)
    from ovis_model.modeling import Ovis

    model = Ovis.from_pretrained(run / "stage3" / "model")
    assert model.text_tokenizer is not None and model.num_visual_tokens == 6


def test_resume_after_sigterm_is_exact(
    stage1_run: Path,
    packed: Path,
    parts: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stopped by SIGTERM early in the first epoch and resumed past the epoch's end: the same losses, bit
    for bit, as the uninterrupted run of the same arguments (the chain's stage 1; checkpoint intervals do
    not change training)."""
    llm_dir, vit_dir = parts
    common = ["--stage", "1", "--data", str(packed), "--llm", str(llm_dir), "--vit", str(vit_dir),
              "--max-steps", str(STAGE1_STEPS), "--set", "train.save_every=100", *FAST]  # fmt: skip
    expected = run_losses(stage1_run / "stage1")
    assert sorted(expected) == list(range(1, STAGE1_STEPS + 1))

    out_b = tmp_path / "b"
    cmd = [sys.executable, "-m", "ovis_model.train", *common, "--out", str(out_b)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=train_env(), cwd=REPO
    )
    metrics = out_b / "stage1" / "metrics.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and len(run_losses(out_b / "stage1")) >= 2:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "Setting accelerator" not in err  # DeepSpeed's notice, once a process: our start line names it
    stopped_at = max(run_losses(out_b / "stage1"))
    assert stopped_at < STAGE1_STEPS, "the run finished before SIGTERM arrived"
    assert (out_b / "stage1" / "checkpoints" / "latest").read_text().strip() == f"step{stopped_at}"

    # without --resume: refused, nothing overwritten (in this process: no DeepSpeed import to pay)
    code, _, err = call(capsys, monkeypatch, "ovis-train", *common, "--out", str(out_b))
    assert code == 2 and "--resume" in err
    assert max(run_losses(out_b / "stage1")) == stopped_at
    resumed = train_here(*common, "--out", str(out_b), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = run_losses(out_b / "stage1")
    assert got == expected  # bit for bit: steps before the stop and after the resume


def test_two_ranks_torchrun_zero2(packed: Path, parts: tuple[Path, Path], tmp_path: Path) -> None:
    """Two ranks under ZeRO-2 (ZeRO-3 on two ranks: test_validation, whose two-rank run also checks the
    val loss, and test_elastic)."""
    llm_dir, vit_dir = parts
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "ovis_model.train",
           "--stage", "1", "--data", str(packed), "--out", str(tmp_path), "--llm", str(llm_dir),
           "--vit", str(vit_dir), "--max-steps", "3", "--set", "deepspeed=zero2.json",
           "--set", 'trainable=["all"]', *FAST_IN_PROCESS]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=train_env(), timeout=400, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "stage1"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 2 and config["deepspeed"]["zero_optimization"]["stage"] == 2
    losses = run_losses(run_dir)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    weights = model_weights(run_dir / "model")
    llm0 = model_weights(llm_dir)
    assert all(w.numel() > 0 for w in weights.values())  # every weight saved whole
    assert any(not torch.equal(weights[k], llm0[k[4:]]) for k in weights if k.startswith("llm."))


def _one_line_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip() and "Warning" not in line]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, p.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_bad_inputs_are_refused_before_compute(
    packed: Path,
    parts: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first mistake in a real process (the line a user sees), the others through the same entry point
    in this process: each is refused before anything is loaded, so none starts DeepSpeed here."""
    llm_dir, vit_dir = parts
    base = ["--llm", str(llm_dir), "--vit", str(vit_dir), *FAST]
    missing = tmp_path / "nowhere"
    _one_line_error(
        ovis_train("--stage", "1", "--data", str(missing), "--out", str(tmp_path), *base), str(missing)
    )

    def refused(*args: str) -> tuple[int, str, str]:
        return call(capsys, monkeypatch, "ovis-train", *args)

    one_line_error(
        refused("--stage", "2", "--data", str(packed), "--out", str(tmp_path / "fresh"), *FAST),
        str(tmp_path / "fresh" / "stage1" / "model"),
    )
    one_line_error(
        refused(
            "--stage",
            "1",
            "--data",
            str(packed),
            "--out",
            str(tmp_path),
            *base,
            "--set",
            'trainable=["llm", "vision_tower"]',
        ),  # fmt: skip
        "stage1.toml",
        "vision_tower",
    )
    one_line_error(
        refused("--stage", "1", "--data", str(packed), "--out", str(tmp_path), *base, "--set", "train.lrr=1"),
        "train.lrr",
    )
    # a manifest packed for another model: 10 visual tokens per image where the model has 6
    other = tmp_path / "other" / "stage1"
    shutil.copytree(packed / "stage1", other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["visual_tokens_per_image"] = 10
    (other / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(
        refused("--stage", "1", "--data", str(other), "--out", str(tmp_path), *base),
        str(other / "manifest.json"),
        "visual tokens per image 10",
        "the model has 6",
    )
