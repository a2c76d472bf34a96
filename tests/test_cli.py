"""The `ovis-data` commands as a user runs them: real processes, exit codes, report format (the demo through
its entry point in this process)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import call, one_line_error, run_cli, world_of_one

from ovis_data.registry import load_registry

DEMO_TEST_STEPS = 2  # the demo's default is 8: at 2 each stage's loss already falls


def test_list_shows_all_datasets_and_presence(demo_root: Path):
    out = run_cli("list", "--root", str(demo_root))
    assert out.returncode == 0, out.stderr
    for name in load_registry():
        assert name[:10] in out.stdout
    assert "present" in out.stdout and "text only" in out.stdout


def test_validate_exit_codes_and_report(demo_root: Path, tmp_path: Path):
    cats = tmp_path / "cats"
    good = run_cli("validate", "arxivqa-100k", "--root", str(demo_root), "--catalog-dir", str(cats))
    assert good.returncode == 0, good.stdout + good.stderr
    report = tmp_path / "report.json"
    bad = run_cli(
        "validate",
        "--stage",
        "2",
        "--root",
        str(demo_root),
        "--report",
        str(report),
        "--catalog-dir",
        str(cats),
        "--deep",
        "--processes",
        "2",
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    data = json.loads(report.read_text())
    assert set(data) == {"datasets", "bad_samples"}
    stage2 = [n for n, s in load_registry().items() if s.stage == 2]
    assert sorted(data["datasets"]) == sorted(stage2)
    for counts in data["datasets"].values():
        assert set(counts) >= {"total", "good", "bad", "by_reason"}
        assert counts["good"] + counts["bad"] == counts["total"]
        assert sum(counts["by_reason"].values()) == counts["bad"]
    samples = data["bad_samples"]
    assert len(samples) == sum(c["bad"] for c in data["datasets"].values())
    assert all(set(s) == {"dataset", "row", "id", "reason", "detail"} for s in samples)
    assert {
        "dataset": "llava-pretrain-558k",
        "row": 1,
        "id": "llava-000001",
        "reason": "missing_image",
        "detail": "missing_00001.jpg: no such file",
    } in samples
    assert (cats / "llava-pretrain-558k.parquet").exists(), "catalogs are written even when samples are bad"
    assert "missing_image" in bad.stdout


def test_validate_usage_errors_exit_2(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    # in this process (the real process's error line: test_errors_are_one_plain_line_naming_the_path)
    code, _, err = call(capsys, monkeypatch, "ovis-data", "validate", "coyo-11m", "--root", str(demo_root))
    assert code == 2 and "coyo-11m" in err
    code, _, err = call(capsys, monkeypatch, "ovis-data", "validate", "--root", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in err
    root = tmp_path / "root"
    shutil.copytree(demo_root / "meta_files", root / "meta_files")
    meta = root / "meta_files" / "geo-177k.json"
    meta.write_text('[\n  {"id": "x", "conversations": [\n    {"from": "human" "value": "hi"}]}\n]')
    code, out, err = call(
        capsys, monkeypatch, "ovis-data", "validate", "geo-177k", "--root", str(root), "--report",
        str(tmp_path / "r.json"),
    )  # fmt: skip
    assert code == 1, out + err  # reported for its dataset, not a crash
    error = json.loads((tmp_path / "r.json").read_text())["datasets"]["geo-177k"]["error"]
    assert error.startswith("meta_file_malformed: ") and "geo-177k.json" in error and "line 3 column" in error
    assert "meta_file_malformed" in out
    code, _, _ = call(capsys, monkeypatch, "ovis-data", "validate", "--stage", "5", "--root", str(root))
    assert code == 2  # as pack --stage 4


def test_root_from_environment_and_own_dataset_info(tmp_path: Path):
    root = tmp_path / "root"
    (root / "meta_files").mkdir(parents=True)
    (root / "meta_files" / "mine.jsonl").write_text(
        json.dumps(
            {"id": "1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
        )
        + "\n"
    )
    info = tmp_path / "info.json"
    info.write_text(
        json.dumps(
            {
                "my-text": {
                    "meta_file": "mine.jsonl",
                    "image_dir": None,
                    "data_format": "conversation",
                    "stage": 3,
                }
            }
        )
    )
    out = run_cli("validate", "--dataset-info", str(info), env={"OVIS_DATA_ROOT": str(root)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert (root / "catalogs" / "my-text.parquet").exists()


def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """`ovis-data demo` through its entry point in this process (the demo's three trainer runs share one
    process as they do in the real command; this module's other tests run `ovis-data` as a real process),
    two steps a stage: each stage's loss already falls."""
    with world_of_one():
        code, stdout, stderr = call(capsys, monkeypatch, "ovis-data", "demo", "--out", str(tmp_path / "demo"),
                                    "--train-steps", str(DEMO_TEST_STEPS))  # fmt: skip
    assert code == 0, stdout + stderr
    demo = tmp_path / "demo"
    report = json.loads((demo / "validate_report.json").read_text())
    assert len(report["datasets"]) == 19
    for stage in (1, 2, 3):
        manifest = json.loads((demo / "packed" / f"stage{stage}" / "manifest.json").read_text())
        assert manifest["records"] > 0 and manifest["stage"] == stage
        assert (demo / "run" / f"stage{stage}" / "model" / "config.json").exists()
        lines = (demo / "run" / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()
        losses = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
        assert len(losses) == DEMO_TEST_STEPS and losses[-1] < losses[0]  # the trainer trained every stage
        assert [r for r in map(json.loads, lines) if r.get("event") == "val"]  # the held-out split's loss
        assert (demo / "packed" / f"stage{stage}" / "val" / "manifest.json").exists()
    summary = json.loads((demo / "eval" / "demo_bench_summary.json").read_text())  # ovis-eval's last step
    assert summary["questions"] > 10 and summary["chance"] == 0.25 and summary["skipped"] == 0
    assert "deliberately broken" in stdout
    assert "Its answer about" in stdout


def test_errors_are_one_plain_line_naming_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """Each mistake a new user makes: exit 2, one line on stderr that names the path, no traceback. One
    real process per program proves the line a user sees (the two run side by side); the other mistakes go
    through the same entry points in this process."""
    root = tmp_path / "root"  # a data root, not a packed shard or a model
    (root / "meta_files").mkdir(parents=True)
    (tmp_path / "empty_tok").mkdir()
    llm = tmp_path / "bare_llm"  # a base LLM folder, not an Ovis model
    llm.mkdir()
    (llm / "config.json").write_text('{"model_type": "qwen2"}')
    readme = str(Path(__file__).parents[1] / "README.md")
    pack = ["pack", "--stage", "1", "--root", str(root), "--out", str(tmp_path / "o")]
    env = {k: v for k, v in os.environ.items() if k != "OVIS_DATA_ROOT"}
    env["HF_HUB_OFFLINE"] = "1"  # the nonexistent tokenizer must not be looked up on the network
    in_processes = [  # (argv after python, what stderr must name)
        (["-m", "ovis_data", *pack, "--tokenizer", "/nonexistent/tok"], "/nonexistent/tok"),
        (["-c", "from ovis_model.chat_cli import main; main()", str(llm), "hi"], str(llm)),
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for argv, _ in in_processes
    ]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    in_this_process = [  # (program, arguments, what the line must name)
        ("ovis-data", ["inspect", readme], readme),
        ("ovis-data", ["inspect", str(root)], str(root)),
        ("ovis-data", [*pack, "--tokenizer", str(tmp_path / "empty_tok")], str(tmp_path / "empty_tok")),
        ("ovis-chat", [str(root), "hi"], str(root)),
        ("ovis-chat", [str(llm), "-i", readme, "hi"], readme),
        ("ovis-data", ["validate", "--root", str(tmp_path / "missing")], str(tmp_path / "missing")),
        ("ovis-data", ["validate", "coyo-11m", "--root", str(root)], "coyo-11m"),
        ("ovis-data", ["pack", "--stage", "x"], "--stage"),
    ]
    for prog, args, named in in_this_process:
        one_line_error(call(capsys, monkeypatch, prog, *args), named)
    for (argv, named), proc in zip(in_processes, procs, strict=True):
        out, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (argv, out, err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], (argv, err)
        assert "Traceback" not in out + err


def _programs() -> dict[str, Any]:
    """Each program's click command, as its entry point builds it."""
    from typer.main import get_command

    from ovis_data.cli import app as data_app
    from ovis_data.clikit import polish
    from ovis_model.chat_cli import app as chat_app
    from ovis_model.eval.cli import app as eval_app
    from ovis_model.train.cli import app as train_app

    apps = (
        ("ovis-data", data_app),
        ("ovis-train", train_app),
        ("ovis-chat", chat_app),
        ("ovis-eval", eval_app),
    )
    return {name: polish(get_command(a)) for name, a in apps}


def _parse(cmd: Any, prog: str, args: list[str]) -> Any:
    """The context `args` parse into (the subcommand's for ovis-data): raises on any usage error."""
    if hasattr(cmd, "commands"):  # ovis-data takes no options of its own but --help and --version
        name, *rest = args
        return cmd.commands[name].make_context(name, rest)
    return cmd.make_context(prog, list(args))


def test_every_help_shows_an_example_that_parses_and_the_readme_agrees(capsys: pytest.CaptureFixture):
    programs = _programs()
    commands = [(p, programs[p], []) for p in ("ovis-train", "ovis-chat", "ovis-eval")]
    commands += [("ovis-data", programs["ovis-data"], [])]
    commands += [("ovis-data", sub, [name]) for name, sub in programs["ovis-data"].commands.items()]
    for prog, cmd, path in commands:
        with pytest.raises(SystemExit) as done:
            top = programs[prog]
            top.main([*path, "--help"], prog_name=prog)
        assert done.value.code == 0
        shown = capsys.readouterr().out
        assert "Example" in shown and "<bool>" not in shown and "{" not in shown.split("\n\n")[1], shown
        # an example may go on over lines ending in a backslash, as a shell reads it
        joined = cmd.help.replace("\\\n", " ")
        examples = [line.strip() for line in joined.splitlines() if line.strip().startswith(prog + " ")]
        assert examples, f"{prog} {' '.join(path)}: no example in its help"
        for line in examples:
            words = shlex.split(line)[1:]
            ctx = _parse(programs[prog], prog, words)
            assert path == [] or ctx.info_name == path[0], line
    # Every option the README's command table shows is one the command takes.
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| `((?:ovis-data|ovis-train|ovis-chat|ovis-eval)[^`]*)` \|", readme, re.M)
    assert len(rows) >= 8
    for row in rows:
        prog, *words = row.split()
        cmd = programs[prog]
        if prog == "ovis-data":
            cmd = cmd.commands[words[0]]
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        assert set(re.findall(r"--[a-z-]+", row)) <= known, row
