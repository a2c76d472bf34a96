"""The commands as a careless user meets them: paths of the wrong kind, Ctrl-C, tables in a pipe, what a
dependency prints, messages that agree. Each mistake: exit status 2, one line on stderr naming the option and
the path, no traceback, nothing left behind. Most run in this process through each program's own entry
point (`clikit.run`); Ctrl-C and a fresh import of DeepSpeed need processes of their own."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from conftest import call, one_line_error
from PIL import Image

from ovis_data.pack.tokenize import bundled_qwen_tokenizer_dir
from ovis_data.registry import load_registry

REPO = Path(__file__).resolve().parents[1]


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture()
def scene(tmp_path: Path, demo_root: Path) -> Path:
    """A working folder as after `ovis-data demo`: a data root (meta files only: nothing here may get as
    far as reading images), a text file, a folder."""
    shutil.copytree(demo_root / "meta_files", tmp_path / "data" / "meta_files")
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "folder").mkdir()
    return tmp_path


def test_paths_of_the_wrong_kind_are_refused_before_any_work(
    scene: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(scene)
    before = tree(scene)
    root, tok = ["--root", "data"], ["--tokenizer", str(bundled_qwen_tokenizer_dir())]
    pack, check = ["pack", "--stage", "3", *root, *tok], ["validate", "geo-177k", *root]
    cases = [  # (program, arguments, what the line must name)
        # a folder where a file is expected
        ("ovis-data", ["list", "--dataset-info", "folder"], ["--dataset-info", "folder", "a folder"]),
        ("ovis-data", ["list", "--recipe", "folder"], ["--recipe", "folder"]),
        ("ovis-data", [*check, "--report", "folder"], ["--report", "folder"]),
        ("ovis-data", ["validate", *root, "--dataset-info", "folder"], ["--dataset-info", "folder"]),
        ("ovis-data", ["fetch", "coyo-10m", *root, "--report", "folder"], ["--report", "folder"]),
        ("ovis-data", [*pack, "--out", "o", "--recipe", "folder"], ["--recipe"]),
        # a file where a folder is expected, or a folder that cannot be created
        ("ovis-data", [*check, "--catalog-dir", "notes.txt"], ["--catalog-dir", "notes.txt"]),
        ("ovis-data", [*pack, "--out", "notes.txt"], ["--out", "notes.txt", "a file"]),
        ("ovis-data", [*pack, "--out", "notes.txt/o"], ["--out", "notes.txt/o"]),
        ("ovis-data", [*check, "--report", "notes.txt/r.json"], ["--report"]),
        ("ovis-data", ["demo", "--out", "notes.txt"], ["--out", "notes.txt"]),
        ("ovis-train", ["--stage", "3", "--data", "folder", "--out", "notes.txt"], ["--out", "notes.txt"]),
        ("ovis-train", ["--stage", "3", "--data", "notes.txt", "--out", "run"], ["--data", "notes.txt"]),
        ("ovis-train", ["--recipe", "folder", "--data", "folder", "--out", "run"], ["--recipe", "folder"]),
    ]  # fmt: skip
    if Path("/proc/self").is_dir():  # a path no one can create, even root
        cases.append(("ovis-data", [*pack, "--out", "/proc/x"], ["--out", "/proc/x"]))
    for prog, args, named in cases:
        one_line_error(call(capsys, monkeypatch, prog, *args), *named)
        assert tree(scene) == before, (args, sorted(set(tree(scene)) - set(before)))  # no .tmp, no catalogs


def test_a_shard_given_as_data_names_its_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = tmp_path / "packed" / "stage3" / "stage3-00000.tar"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"\0" * 1024)
    line = one_line_error(
        call(capsys, monkeypatch, "ovis-train", "--stage", "3", "--data", str(shard), "--out", str(tmp_path)),
        "--data",
        str(shard),
    )
    assert "a shard; pass its folder" in line and str(shard.parent) in line


def test_messages_agree(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # one wording for a stage without a shipped recipe, whichever command is asked
    wording = "no shipped recipe for stage 7"
    tok = str(bundled_qwen_tokenizer_dir())
    for prog, args in (
        ("ovis-data", ["validate", "--stage", "7", "--root", str(tmp_path)]),
        ("ovis-data", ["list", "--stage", "7"]),
        ("ovis-data", ["get", "--stage", "7", "--root", str(tmp_path)]),
        ("ovis-data", ["report", "--stage", "7", "--root", str(tmp_path), "--out", str(tmp_path / "r.html")]),
        ("ovis-data", ["pack", "--stage", "7", "--root", str(tmp_path), "--tokenizer", tok, "--out", "o"]),
        ("ovis-train", ["--stage", "7", "--data", str(tmp_path), "--out", str(tmp_path / "run")]),
    ):
        one_line_error(call(capsys, monkeypatch, prog, *args), wording)
    # an override of the recipe is blamed on --set, not on the recipe file it overrides
    run = ["--stage", "2", "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    for setting, named in (("train.bogus=1", "unknown key train.bogus"), ("train.lr=fast", "is not a float")):
        line = one_line_error(call(capsys, monkeypatch, "ovis-train", *run, "--set", setting), named)
        assert line.startswith(f"error: --set {setting} "), line
    assert not (tmp_path / "run").exists()


def test_tables_in_a_pipe_never_cut_a_name(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")  # as narrow as a pipe's default
    code, out, _ = call(capsys, monkeypatch, "ovis-data", "list", "--root", str(demo_root))
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == list(load_registry())  # whole, once each
    assert "…" not in out
    # validate's table: every dataset name whole, the reasons beside it
    code, out, _ = call(
        capsys, monkeypatch, "ovis-data", "validate", "--stage", "2", "--root", str(demo_root),
        "--catalog-dir", str(tmp_path / "cats"), "--meta-only",
    )  # fmt: skip
    assert code == 1 and "…" not in out
    names = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")]
    assert names == [n for n, s in load_registry().items() if s.stage == 2]
    assert re.search(r"│ llava-pretrain-558k .*missing_image: 1", out), out


def test_pack_counts_an_unchecked_bomb_instead_of_printing_pillows_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catalog of `validate --meta-only` never had its pixels checked: pack meets the image over
    Pillow's limit (validate's default --max-pixels), drops it and says so in its summary, not as a
    warning from Pillow."""
    work = tmp_path / "mine"
    shutil.copytree(
        REPO / "docs" / "examples" / "own-datasets", work, ignore=shutil.ignore_patterns("catalogs")
    )
    Image.new("1", (12000, 8000)).save(work / "data" / "images" / "my_charts" / "bomb.png")
    meta = work / "data" / "meta_files" / "my-charts-qa.jsonl"
    meta.write_text(meta.read_text().replace('"bars_1.png"', '"bomb.png"', 1))
    monkeypatch.chdir(work)
    mine = ["--recipe", "my_recipe.toml", "--dataset-info", "my_info.json", "--root", "data"]
    code, _, err = call(
        capsys, monkeypatch, "ovis-data", "validate", *mine, "--meta-only", "--processes", "1"
    )
    assert code == 1, err  # the example's own two bad samples
    tiny = ["--visual-tokens", "6", "--image-size", "28", "--max-length", "256", "--processes", "1"]
    tok = ["--tokenizer", str(bundled_qwen_tokenizer_dir())]
    code, out, err = call(capsys, monkeypatch, "ovis-data", "pack", *mine, *tok, "--out", "packed", *tiny)
    assert code == 0, err
    assert "DecompressionBomb" not in err and "Traceback" not in err, err
    assert re.search(r"│ my-charts-qa .*decompression_bomb 1", out), out
    manifest = json.loads((work / "packed" / "stage4" / "manifest.json").read_text())
    assert manifest["datasets"]["my-charts-qa"]["dropped"] == {"decompression_bomb": 1}


def test_dependencies_stay_quiet(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    # DeepSpeed's import (a fresh process: it speaks once per process) after the commands' setup
    quiet = "from ovis_data.clikit import quiet_dependencies; quiet_dependencies(); import deepspeed"
    ds = subprocess.Popen([sys.executable, "-c", quiet], stderr=subprocess.PIPE, text=True, cwd=REPO)
    from test_templates_tokenizers import llama3_tokenizer, save

    from ovis_data.pack.images import resize_for_vit
    from ovis_data.pack.tokenize import load_tokenizer
    from ovis_model.modeling import Ovis
    from ovis_model.tiny import tiny_ovis, write_tiny_parts

    # checkpointing through transformers' current API: no FutureWarning
    model = tiny_ovis()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.gradient_checkpointing_enable()
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    llm = model.llm
    assert (
        llm.is_activation_checkpointing
        if hasattr(llm, "activation_checkpointing_enable")
        else llm.is_gradient_checkpointing
    )
    # a model folder as --tokenizer: its tokenizer, without transformers' model-type notice
    tok = save(llama3_tokenizer(), tmp_path / "tok")
    llm, vit = write_tiny_parts(tmp_path / "parts", image_size=28, tokenizer_dir=tok)
    Ovis.from_parts(llm=llm, vit=vit, visual_vocab_size=64).save_pretrained(tmp_path / "model")
    capfd.readouterr()
    assert load_tokenizer(tmp_path / "model").is_fast
    assert "model of type" not in capfd.readouterr().err
    # an image over Pillow's limit: an error pack counts as decompression_bomb, not a printed warning
    bomb = io.BytesIO()
    Image.new("1", (12000, 8000)).save(bomb, format="PNG")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning escaping resize_for_vit would fail here
        with pytest.raises(Image.DecompressionBombWarning):
            resize_for_vit(bomb.getvalue(), 28)
    _, err = ds.communicate(timeout=300)
    assert ds.returncode == 0, err
    assert "Setting accelerator" not in err


def test_ctrl_c_during_pack_says_one_line_and_the_rerun_finishes(
    packed: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C reaches a real process group (the CLI and its pool); the re-run, the same command, goes
    through the same entry point in this process. The demo corpus as validated when conftest's `packed`
    was packed: both runs go straight to packing."""
    root, out = tmp_path / "data", tmp_path / "packed"
    shutil.copytree(packed.parent / "data", root)
    argv = [sys.executable, "-m", "ovis_data", "pack", "--stage", "3", "--root", str(root), "--tokenizer",
            str(bundled_qwen_tokenizer_dir()), "--out", str(out), "--processes", "2"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "OVIS_DATA_ROOT"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    tok_dir = out / "stage3" / ".work" / "tok"
    deadline = time.monotonic() + 600
    while proc.poll() is None and not list(tok_dir.glob("*.arrow")) and time.monotonic() < deadline:
        time.sleep(0.02)  # until the pool has tokenized one unit: its processes are at work
    assert proc.poll() is None, "pack finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole process group
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["interrupted; re-run the same command to continue"], stderr
    assert "Traceback" not in stdout + stderr
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))
    assert not (out / "stage3" / "manifest.json").exists()
    code, _, err = call(capsys, monkeypatch, "ovis-data", *argv[3:])
    assert code == 0, err
    assert json.loads((out / "stage3" / "manifest.json").read_text())["records"] > 0
