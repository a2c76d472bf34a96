"""`ovis-data fetch` as a user runs it: the demo corpus's URL datasets from a local server, then validate."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import call, run_cli

from ovis_data.imagestore import ImageStore

REPO = Path(__file__).resolve().parents[1]
URL_DATASETS = ["coyo-10m", "cc12m-description-1m", "cc12m-qa-387k"]


def validate_counts(root: Path, tmp: Path) -> dict:
    report = tmp / "validate.json"
    out = run_cli(
        "validate", *URL_DATASETS, "--root", str(root), "--report", str(report), "--catalog-dir", str(tmp)
    )
    assert out.returncode in (0, 1), out.stdout + out.stderr
    return json.loads(report.read_text())["datasets"]


@pytest.fixture(scope="module")
def reference_counts(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """validate's view of the same corpus built with every image in place."""
    return validate_counts(demo_root, tmp_path_factory.mktemp("reference"))


@pytest.mark.parametrize("layout", ["files", "shards"])
def test_fetch_cli_fills_the_store_that_validate_reads(
    corpus: Path, reference_counts: dict, tmp_path: Path, layout: str
) -> None:
    root = tmp_path / "data"
    shutil.copytree(corpus, root)
    report = tmp_path / "fetch.json"
    args = ["fetch", "--root", str(root), "--layout", layout, "--report", str(report), "--shard-size", "32"]
    if layout == "files":
        refused = run_cli(*args, "coyo-10m")  # loopback without --allow-private: refused, run completes
        assert refused.returncode == 0, refused.stdout + refused.stderr
        assert set(json.loads(report.read_text())["failed"]) == {"private_address"}
        shutil.rmtree(root / "images" / "coyo_10m")  # start over with the flag

    out = run_cli(*args, "--allow-private")
    assert out.returncode == 0, out.stdout + out.stderr
    reports = json.loads(report.read_text())
    assert [r["dataset"] for r in reports] == ["coyo-10m", "cc12m-description-1m+cc12m-qa-387k"]
    for r in reports:
        assert {"dataset", "total", "success", "failed", "elapsed_s", "images_per_s"} <= set(r)
        assert r["success"] + sum(r["failed"].values()) == r["total"]
    assert reports[0]["failed"] == {"http_404": 3}  # the demo's three offline coyo images
    assert reports[1]["failed"] == {}
    assert ImageStore(root / "images" / "ovis_cc12m").layout == layout
    # validate sees the fetched images exactly as it sees the same corpus built with images in place.
    assert validate_counts(root, tmp_path / "catalogs") == reference_counts


def test_fetch_cli_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the first two in this process (ovis-data's error line in a real process: test_cli and below)
    (tmp_path / "meta_files").mkdir()
    code, _, err = call(
        capsys, monkeypatch, "ovis-data", "fetch", "llava-pretrain-558k", "--root", str(tmp_path)
    )
    assert code == 2 and "no URL source" in err
    code, _, err = call(
        capsys, monkeypatch, "ovis-data", "fetch", "coyo-10m", "--root", str(tmp_path), "--part", "3/2"
    )
    assert code == 2 and "--part" in err
    # the list is first asked of its source on the Hub: offline, that fails at once (no network here). A
    # real process: huggingface_hub reads HF_HUB_OFFLINE when it is imported
    out = run_cli("fetch", "coyo-10m", "--root", str(tmp_path), env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and "URL list not found" in out.stderr


I2D = Path(os.environ.get("OVIS_IMG2DATASET", REPO / ".bench" / "i2d-venv" / "bin" / "img2dataset"))


@pytest.mark.skipif(not I2D.exists(), reason="img2dataset not installed (optional; see README)")
@pytest.mark.parametrize("layout", ["files", "shards"])
def test_img2dataset_engine_fills_the_same_store(corpus: Path, tmp_path: Path, layout: str) -> None:
    root = tmp_path / "data"
    shutil.copytree(corpus, root)
    report = tmp_path / "fetch.json"
    out = run_cli(
        "fetch", "coyo-10m", "--root", str(root), "--engine", "img2dataset", "--layout", layout,
        "--report", str(report), "--processes", "1", "--concurrency", "8",
        env={"OVIS_IMG2DATASET": str(I2D)},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads(report.read_text())
    assert data["engine"] == "img2dataset" and data["failed"] == {"http_404": 3}
    store = ImageStore(root / "images" / "coyo_10m")
    assert store.layout == layout
    paths = pq.read_table(root / "meta_files" / "coyo-10m.parquet").column("image_path").to_pylist()
    for p in paths[:-3]:
        assert store.read_bytes(p)[:2] == b"\xff\xd8"
