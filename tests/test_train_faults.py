"""`ovis-train` under faults, as an operator meets them: a planted pickle, a damaged checkpoint, two runs
into one folder, SIGKILLs, a kill during export, missing or damaged shards, a full disk, a killed build.

One packed stage and one trained run (3 steps, a checkpoint at each) are shared by the module; each test
copies what it damages. Real processes, real DeepSpeed on CPU, real tars.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import train_here
from test_train import FAST, FAST_IN_PROCESS, ovis_train, train_env

from ovis_model.train import ckpt_manifest

REPO = Path(__file__).resolve().parents[1]


def _common(packed: Path, parts: tuple[Path, Path], steps: int, fast: list[str] = FAST) -> list[str]:
    return ["--stage", "1", "--data", str(packed), "--llm", str(parts[0]), "--vit", str(parts[1]),
            "--max-steps", str(steps), "--set", "train.save_every=1", *fast]  # fmt: skip


def _here(packed: Path, parts: tuple[Path, Path], steps: int) -> list[str]:
    """_common for a run in this process (train_here): its batches read without a loader worker."""
    return _common(packed, parts, steps, FAST_IN_PROCESS)


@pytest.fixture(scope="module")
def trained(packed: Path, parts: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN with stage1/checkpoints/step1..3 and stage1/model."""
    out = tmp_path_factory.mktemp("trained") / "run"
    p = train_here(*_here(packed, parts, 3), "--out", str(out))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def _error_line(p: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert p.returncode == code, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, p.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _copy_run(trained: Path, dest: Path) -> Path:
    shutil.copytree(trained, dest, symlinks=True)
    return dest


def _descendants(pid: int) -> set[int]:
    """Every living process below `pid` (children, their children...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited: only its parent's wait is missing


def _kill_and_expect_no_orphans(proc: subprocess.Popen, watched: set[int]) -> None:
    """SIGKILL `proc`; every process of `watched` (its descendants, seen while it ran) is gone within
    15 seconds."""
    watched |= _descendants(proc.pid)
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(p) for p in watched):
        time.sleep(0.2)
    left = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in watched if _alive(p)}
    for p in left:
        os.kill(p, signal.SIGKILL)  # leave nothing behind for the next test
    assert not left, f"orphans 15 s after SIGKILL: {left}"


def test_two_runs_one_folder_sigkill_and_resume(
    packed: Path,
    parts: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """A second run into a running run's folder exits 2 naming the holder (refused before any compute:
    through the CLI's entry point in this process); SIGKILL of the trainer leaves no worker, forkserver or
    resource tracker; the resumed run takes over the dead run's lock, builds no DeepSpeed op (an empty
    extension cache stays empty: the op serves only tensor-parallel inference), and metrics.jsonl has one
    record per step."""
    out = tmp_path / "run"
    stage = out / "stage1"
    # far more steps than it will live: the first run must still hold the folder when the second starts,
    # however slow the machine (it is killed below)
    common = _common(packed, parts, 100_000)
    cmd = [sys.executable, "-m", "ovis_model.train", *common, "--out", str(out)]
    quiet = {"stdout": subprocess.DEVNULL, "env": train_env(), "cwd": REPO}
    first = subprocess.Popen(cmd, stderr=subprocess.PIPE, **quiet)
    watched: set[int] = set()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None:
            watched |= _descendants(first.pid)
            if (stage / "metrics.jsonl").exists() and len(_steps(stage)) >= 2:
                break
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read().decode()[-3000:]
        second = train_here(*common, "--out", str(out), "--resume")
        _error_line(second, 2, str(stage), f"process {first.pid}")
        assert len(watched) >= 3, watched  # forkserver, its loader worker, the resource tracker
        _kill_and_expect_no_orphans(first, watched)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    logged = _steps(stage)
    last = max(int(p.name[4:]) for p in (stage / "checkpoints").glob("step*"))
    # an empty extension cache: a CPU run compiles nothing into it (no minute of g++, no build lock); its
    # batches read in its own process (the killed run's loader worker is what the kill above is about)
    ext = tmp_path / "ext"
    ext.mkdir()
    env = {**train_env(), "TORCH_EXTENSIONS_DIR": str(ext)}
    resumed = subprocess.run(
        [sys.executable, "-m", "ovis_model.train", *_common(packed, parts, last + 1, FAST_IN_PROCESS),
         "--out", str(out), "--resume"],
        capture_output=True, text=True, env=env, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"took over the lock of process {first.pid}" in resumed.stdout
    assert not list(ext.iterdir()) and "built successfully" not in resumed.stdout
    steps = _steps(stage)
    assert steps == list(range(1, last + 2)), (logged, steps)  # one record per step, none repeated
    assert (stage / ".lock").read_text() == ""  # released at the clean end


def test_sigkill_of_pack_leaves_no_worker(packed: Path, parts: tuple[Path, Path], tmp_path: Path) -> None:
    root = packed.parent / "data"  # validated when `packed` was packed: pack goes straight to its pool
    cmd = [sys.executable, "-m", "ovis_data", "pack", "--stage", "1", "--root", str(root), "--tokenizer",
           str(parts[0]), "--out", str(tmp_path / "packed"), "--processes", "2", "--visual-tokens", "6",
           "--image-size", "28", "--max-length", "256", "--packs-per-shard", "4"]  # fmt: skip
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": train_env(), "cwd": REPO}
    proc = subprocess.Popen(cmd, **quiet)
    watched: set[int] = set()
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            now = _descendants(proc.pid)
            watched |= now
            if any(_descendants(child) for child in now):  # a pool worker (the forkserver's child) runs
                break
            time.sleep(0.02)
        assert proc.poll() is None, "pack ended before its pool workers were seen"
        _kill_and_expect_no_orphans(proc, watched)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_damaged_latest_checkpoint_falls_back_to_the_previous(
    trained: Path,
    packed: Path,
    parts: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    out = _copy_run(trained, tmp_path / "run")
    stage = out / "stage1"
    states = stage / "checkpoints" / "step3" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])  # truncated, as a full disk or a cut copy leaves it
    p = train_here(*_here(packed, parts, 4), "--out", str(out), "--resume")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"{stage / 'checkpoints' / 'step3'} cannot be resumed from: {states} has 1,000 bytes" in p.stdout
    assert f"resumed from {stage / 'checkpoints' / 'step2'} at step 2" in p.stdout
    assert _steps(stage) == [1, 2, 3, 4]  # the first run's step 3 superseded by the resumed run's


class _Payload:
    """A pickle that runs a command when loaded (what an attacker would put in a run folder)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickle_in_a_checkpoint_never_runs(
    trained: Path,
    packed: Path,
    parts: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    import torch

    out = _copy_run(trained, tmp_path / "run")
    tag = out / "stage1" / "checkpoints" / "step3"
    marker = tmp_path / "pwned"
    planted = tag / "mp_rank_00_model_states.pt"
    torch.save({"module": _Payload(marker), "dp_world_size": 1}, planted)
    ckpt_manifest.write(tag, 3)  # its manifest rewritten too: only the weights-only loading stands in the way
    p = train_here(*_here(packed, parts, 4), "--out", str(out), "--resume")
    _error_line(p, 2, str(planted), "refused", "posix.system")
    assert not marker.exists()
    # the control: loading that file the way DeepSpeed does runs the payload
    unsafe = f"import torch; torch.load({str(planted)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", unsafe], env=train_env(), timeout=120, capture_output=True)
    assert marker.exists()


def _garble_images(stage_dir: Path, shards: list[str] | None = None) -> int:
    """Overwrite every image of the named shards (all by default) in place: sizes unchanged, JPEGs
    undecodable. Returns how many images."""
    n = 0
    for tar in sorted(stage_dir.glob("*.tar")):
        if shards is not None and tar.name not in shards:
            continue
        with tarfile.open(tar) as tf:
            spans = [(m.offset_data, m.size) for m in tf.getmembers() if m.name.endswith((".jpg", ".jpeg"))]
        with open(tar, "r+b") as f:
            for offset, size in spans:
                f.seek(offset)
                f.write(b"\x00" * size)
                n += 1
    return n


def test_skip_bad_shards_never_loses_data_silently(
    packed: Path,
    parts: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    broken = tmp_path / "broken" / "stage1"
    shutil.copytree(packed / "stage1", broken)
    assert _garble_images(broken) > 0
    skip = ["--set", "train.skip_bad_shards=true"]
    p = train_here(*_here(broken, parts, 3), *skip, "--out", str(tmp_path / "all"))
    _error_line(p, 2, "train.max_lost_fraction=0.01", "lost")
    assert "skipping damaged shard" in p.stdout
    assert not (tmp_path / "all" / "stage1" / "model").exists()

    one = tmp_path / "one" / "stage1"
    shutil.copytree(packed / "stage1", one)
    name = sorted(one.glob("*.tar"))[0].name
    _garble_images(one, [name])
    p = train_here(*_here(one, parts, 2), *skip, "--set", "train.max_lost_fraction=0.5", "--out",
                   str(tmp_path / "some"))  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"skipping damaged shard {name}: record" in p.stdout  # when it happens
    assert "1 damaged shard(s) skipped" in p.stdout and f"    {name}: record" in p.stdout  # and at the end
    assert json.loads((tmp_path / "some" / "stage1" / "summary.json").read_text())["epoch"]["bad_shards"] == [
        name
    ]


def test_bad_starts_are_one_line_before_compute(
    trained: Path,
    packed: Path,
    parts: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """Each refused start: exit 2 and one `error:` line naming what is wrong. The first through a real
    process (the line and exit status a user sees); the others through the same entry point in this
    process (all are refused in setup, before the distributed group or any compute)."""

    # --resume where there is no checkpoint (a mistyped --out): refused, saying where it looked
    typo = tmp_path / "typo"
    _error_line(ovis_train(*_common(packed, parts, 2), "--out", str(typo), "--resume"), 2,
                str(typo / "stage1" / "checkpoints"))  # fmt: skip
    assert not typo.exists()  # a refused run leaves no folder (nor its lock) behind
    # a shard missing, a shard truncated: refused before any compute, naming it
    data = tmp_path / "data" / "stage1"
    shutil.copytree(packed / "stage1", data)
    shards = sorted(data.glob("*.tar"))
    shards[1].unlink()
    _error_line(
        train_here(*_common(data, parts, 2), "--out", str(tmp_path / "r1")), 2, str(shards[1]), "missing"
    )
    shutil.copy(packed / "stage1" / shards[1].name, shards[1])
    shards[2].write_bytes(shards[2].read_bytes()[:-1024])
    _error_line(
        train_here(*_common(data, parts, 2), "--out", str(tmp_path / "r2")), 2, str(shards[2]), "bytes"
    )
    # a shard of the right size but other bytes: --verify-data finds it
    shutil.copy(packed / "stage1" / shards[2].name, shards[2])
    _garble_images(data, [shards[3].name])
    _error_line(train_here(*_common(data, parts, 2), "--out", str(tmp_path / "r3"), "--verify-data"), 2,
                str(shards[3]), "sha256")  # fmt: skip
    # a model folder whose weights are a pickle: one line
    init = tmp_path / "pickled"
    shutil.copytree(trained / "stage1" / "model", init)
    for f in init.glob("*.safetensors"):
        f.unlink()
    (init / "pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    p = train_here("--stage", "1", "--data", str(packed), "--out", str(tmp_path / "r4"), "--init", str(init),
                   *FAST)  # fmt: skip
    _error_line(p, 2, str(init / "pytorch_model.bin"), "safetensors")
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 5))


def test_kill_during_export_keeps_the_previous_model(trained: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(trained / "stage1" / "model", model_dir)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from ovis_model.modeling import Ovis\n"
        "from ovis_model.train.checkpoint import publish_dir\n"
        "model = Ovis.from_pretrained(sys.argv[1])\n"
        "def write(tmp):\n"
        "    model.save_pretrained(tmp, safe_serialization=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)  # killed with the new folder written, not yet in place\n"
        "publish_dir(Path(sys.argv[2]), write)\n"
    )
    p = subprocess.run([sys.executable, "-c", script, str(model_dir), str(model_dir)], env=train_env(),
                       capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    assert (tmp_path / "model.partial" / "config.json").exists()


def test_full_disk_is_one_line(packed: Path, parts: tuple[Path, Path], tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True,
                       text=True)  # fmt: skip
    if m.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {m.stderr.strip() or m.returncode}")
    try:
        out = mnt / "run"
        p = train_here(*_here(packed, parts, 2), "--out", str(out))
        line = _error_line(
            p, 1, str(out / "stage1" / "checkpoints"), "no space left on device", "needs about"
        )
        assert "free" in line
        assert not (out / "stage1" / "checkpoints" / "step1").exists()  # the incomplete checkpoint removed
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_inspect_refuses_a_tar_without_records(tmp_path: Path, parts: tuple[Path, Path]) -> None:
    tar = tmp_path / "notes.tar"
    (tmp_path / "a.txt").write_text("not a packed record\n")
    with tarfile.open(tar, "w") as tf:
        tf.add(tmp_path / "a.txt", arcname="a.txt")
    p = subprocess.run([sys.executable, "-m", "ovis_data", "inspect", str(tar), "--tokenizer", str(parts[0])],
                       capture_output=True, text=True, env=train_env(), timeout=120, cwd=REPO)  # fmt: skip
    _error_line(p, 2, str(tar), "not a record written by ovis-data pack")


def test_op_cache_is_this_environments_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ops DeepSpeed does build (a GPU optimizer a config asks for) go to the user's TORCH_EXTENSIONS_DIR,
    else a folder of this environment, never the cache every environment shares."""
    from ovis_model.train import opcache

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert opcache.extensions_dir() == Path(sys.prefix) / "var" / "torch_extensions"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "var" / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert opcache.extensions_dir() == tmp_path / "ext"
