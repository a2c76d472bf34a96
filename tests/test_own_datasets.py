"""docs/own-datasets.md as a user runs it: the example's dataset_info.json, meta files, images and recipe
(docs/examples/own-datasets/), registered, listed, validated, packed and trained, `ovis-data` and
`ovis-train` through their entry points in this process (test_cli and test_train run them as processes).
Only the tiny model's geometry and CPU-sized training settings are added to the documented commands (a tiny
Ovis stands in for RUN/stage3/model; its tokenizer is a 600-token BPE with Llama 3's special tokens, as in
test_train.py).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import call, train_here
from test_templates_tokenizers import llama3_tokenizer, save

from ovis_model.modeling import Ovis
from ovis_model.tiny import write_tiny_parts

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "own-datasets"
MINE = ["--recipe", "my_recipe.toml", "--dataset-info", "my_info.json"]


def test_own_datasets_register_validate_pack_train(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "mine"
    shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns("catalogs", "packed", "run", "bad.json"))
    # the model the example fine-tunes (RUN/stage3/model in the docs), with its tokenizer
    tok = save(llama3_tokenizer(), tmp_path / "tok")
    llm, vit = write_tiny_parts(tmp_path / "parts", image_size=28, tokenizer_dir=tok)
    model = tmp_path / "stage3-model"
    Ovis.from_parts(llm=llm, vit=vit, visual_vocab_size=64).save_pretrained(model)

    monkeypatch.chdir(work)
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = call(capsys, monkeypatch, "ovis-data", "list", *MINE, "--root", "data")
    assert code == 0, out + err
    for needle in ("my-charts-qa", "my-photo-captions", "4: packs into OUT/stage4", "zero3.json (shipped)"):
        assert needle in out, out

    code, out, err = call(
        capsys, monkeypatch, "ovis-data", "validate", *MINE, "--root", "data", "--report", "bad.json"
    )
    assert code == 1, out + err  # 1: bad samples, catalogs written
    report = json.loads((work / "bad.json").read_text())
    assert {(b["dataset"], b["row"], b["id"], b["reason"]) for b in report["bad_samples"]} == {
        ("my-charts-qa", 12, "chart-013", "missing_image"),
        ("my-photo-captions", 12, "photo-013", "empty_caption"),
    }
    # the doc quotes the report validate writes, line for line
    doc = (REPO / "docs" / "own-datasets.md").read_text()
    quoted = [json.loads(line) for line in doc.splitlines() if line.startswith('{"dataset": ')]
    assert len(quoted) == 2 and report["bad_samples"] == quoted
    assert (work / "data" / "catalogs" / "my-charts-qa.parquet").is_file()

    tiny = ["--visual-tokens", "6", "--image-size", "28", "--max-length", "256", "--processes", "1"]
    code, out, err = call(
        capsys, monkeypatch, "ovis-data", "pack", *MINE, "--root", "data", "--tokenizer", str(model),
        "--out", "packed", *tiny,
    )  # fmt: skip
    assert code == 0, out + err
    manifest = json.loads((work / "packed" / "stage4" / "manifest.json").read_text())
    assert manifest["stage"] == 4 and manifest["recipe"] == "my_recipe.toml"
    assert {n: d["packed"] for n, d in manifest["datasets"].items()} == {
        "my-charts-qa": 12,
        "my-photo-captions": 24,  # weight 2.0: every good caption twice
    }
    assert manifest["template"]["captions"] == {"my-photo-captions": "<image>\nPhoto description: "}

    cpu = ["--max-steps", "3", "--micro-batch-tokens", "256", "--set", "train.global_batch_samples=4",
           "--set", "train.num_workers=0", "--set", "train.gradient_checkpointing=false",
           "--set", "train.lr=0.003"]  # fmt: skip
    # in this process (the loader's workers and a real process: test_train, test_loader)
    trained = train_here(*MINE, "--data", "packed", "--out", "run", "--init", str(model), *cpu)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    run = work / "run" / "stage4"
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["stage"] == 4
    assert config["config"]["deepspeed"] == str(REPO / "pipelines" / "zero3.json")  # the shipped fallback
    assert config["deepspeed"]["zero_optimization"]["stage"] == 3
    lines = (run / "metrics.jsonl").read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert (run / "model" / "config.json").is_file()
