"""The `ovis-data` commands as a user runs them: real processes, exit codes, report format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import run_cli

from ovis_data.registry import load_registry


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


def test_validate_usage_errors_exit_2(demo_root: Path, tmp_path: Path):
    unknown = run_cli("validate", "coyo-11m", "--root", str(demo_root))
    assert unknown.returncode == 2 and "coyo-11m" in unknown.stderr
    no_root = run_cli("validate", "--root", str(tmp_path / "missing"))
    assert no_root.returncode == 2 and "does not exist" in no_root.stderr
    root = tmp_path / "root"
    shutil.copytree(demo_root / "meta_files", root / "meta_files")
    meta = root / "meta_files" / "geo-177k.json"
    meta.write_text('[\n  {"id": "x", "conversations": [\n    {"from": "human" "value": "hi"}]}\n]')
    broken = run_cli("validate", "geo-177k", "--root", str(root), "--report", str(tmp_path / "r.json"))
    assert broken.returncode == 1, broken.stdout + broken.stderr  # reported for its dataset, not a crash
    error = json.loads((tmp_path / "r.json").read_text())["datasets"]["geo-177k"]["error"]
    assert error.startswith("meta_file_malformed: ") and "geo-177k.json" in error and "line 3 column" in error
    assert "meta_file_malformed" in broken.stdout
    assert run_cli("validate", "--stage", "5", "--root", str(root)).returncode == 2  # as pack --stage 4


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


def test_demo_runs_end_to_end(tmp_path: Path):
    out = run_cli("demo", "--out", str(tmp_path / "demo"), "--train-steps", "4")
    assert out.returncode == 0, out.stdout + out.stderr
    demo = tmp_path / "demo"
    report = json.loads((demo / "validate_report.json").read_text())
    assert len(report["datasets"]) == 19
    for stage in (1, 2, 3):
        manifest = json.loads((demo / "packed" / f"stage{stage}" / "manifest.json").read_text())
        assert manifest["records"] > 0 and manifest["stage"] == stage
        assert (demo / "run" / f"stage{stage}" / "model" / "config.json").exists()
        lines = (demo / "run" / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()
        losses = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
        assert len(losses) == 4 and losses[-1] < losses[0]  # the trainer trained every stage
    assert "deliberately broken" in out.stdout
    assert "Its answer about" in out.stdout
