"""`ovis-data report`: a real corpus validated and packed in-process, the page written by the command, then
opened in Debian's chromium (headless, driven by playwright) as a person would open it."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import run_cli
from test_templates_tokenizers import qwen_path
from test_validate import write_shards

from ovis_data.errors import OvisDataError
from ovis_data.pack.stage import pack_stage
from ovis_data.registry import load_registry
from ovis_data.report.build import make_report, select_datasets
from ovis_data.validate.dataset import validate_dataset

CHROMIUM = Path("/usr/bin/chromium")
# A caption dataset (in the shards layout, three images never fetched), conversations with a missing and
# a truncated image, an escaping path, a decompression bomb, and a text-only dataset with an empty one.
DATASETS = {
    "coyo-10m": 0.5,
    "llava-pretrain-558k": 1.0,
    "geo-177k": 1.0,
    "synthdog-en-ocr-200k": 1.0,
    "allava-evol-instruct-143k": 1.0,
}
META_ONLY = "geo-177k"  # validated without opening images: the report measures a sample of them


def _recipe(path: Path) -> Path:
    lines = ["stage = 3", "max_length = 2048", 'trainable = ["all"]', "[train]", "lr = 1e-5"]
    for name, weight in DATASETS.items():
        lines += ["[[datasets]]", f'name = "{name}"', f"weight = {weight}"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def made(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("report")
    root = base / "data"
    registry = load_registry()
    for name in DATASETS:
        spec = registry[name]
        (root / "meta_files").mkdir(parents=True, exist_ok=True)
        shutil.copy(spec.meta_path(demo_root), spec.meta_path(root))
        if spec.image_dir is None:
            continue
        src = spec.image_path(demo_root)
        if name == "coyo-10m":  # as fetch --layout shards leaves it: tars + index
            images = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}
            write_shards(spec.image_path(root), images, per_shard=40)
        else:
            shutil.copytree(src, spec.image_path(root))
    results = {
        name: validate_dataset(registry[name], root, "meta" if name == META_ONLY else "header", processes=1)
        for name in DATASETS
    }
    recipe = _recipe(base / "mix.toml")
    manifest = pack_stage(recipe, root, qwen_path(), base / "packed", processes=1, packs_per_shard=4)
    html = base / "report.html"
    made = run_cli(
        "report", "--recipe", str(recipe), "--root", str(root), "--packed", str(base / "packed"),
        "--out", str(html), "--samples", "3",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    return {"root": root, "recipe": recipe, "results": results, "manifest": manifest, "html": html,
            "base": base, "stdout": made.stdout}  # fmt: skip


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.refs += [v or "" for k, v in attrs if k in ("src", "href", "srcset", "action", "data")]


def test_the_page_is_self_contained(made: dict):
    text = made["html"].read_text(encoding="utf-8")
    refs = _Refs()
    refs.feed(text)
    assert refs.refs and all(r.startswith(("data:", "#")) for r in refs.refs), refs.refs
    assert "script" not in refs.tags and '<link rel="stylesheet"' not in text
    assert not re.search(r"url\((?!data:)", text), "no CSS resource from outside"
    assert "report of 5 datasets written to" in made["stdout"]


def test_counts_are_validates_and_drops_are_packs(made: dict):
    sel = select_datasets(None, None, made["recipe"], None)
    report = make_report(
        sel, made["root"], made["base"] / "again.html", packed=made["base"] / "packed", samples=3
    )
    for d in report.datasets:
        r = made["results"][d.name]
        assert (d.total, d.good, d.rejected) == (r.total, r.good, r.by_reason), d.name
    assert report.datasets[1].rejected == {"missing_image": 1, "truncated_image": 1}
    assert report.packed.manifest["datasets"] == made["manifest"]["datasets"]
    coyo = report.datasets[0]
    assert [h.title for h in coyo.histograms] == [
        "text tokens (approximate)", "images per sample", "image longer side",
    ]  # fmt: skip
    sizes = {d.name: d.histograms[-1] for d in report.datasets}
    assert sizes["llava-pretrain-558k"].summary["n"] == sum(
        len(c) for c in _images(made, "llava-pretrain-558k")
    )
    assert "seeded sample" in sizes[META_ONLY].note and sizes[META_ONLY].summary["n"] > 0
    for d in report.datasets:
        assert all(sum(h.counts) == h.summary["n"] for h in d.histograms), d.name
    per_sample = next(h for h in report.datasets[1].histograms if h.title == "images per sample")
    lengths = Counter(len(x) for x in _images(made, "llava-pretrain-558k"))
    assert {per_sample.lo + i * per_sample.width: c for i, c in enumerate(per_sample.counts) if c} == lengths
    text_only = report.datasets[-1]
    assert [h.title for h in text_only.histograms] == [
        "text tokens (approximate)",
        "turns per sample",
    ]
    # the same inputs give the same bytes; another seed another gallery
    assert (made["base"] / "again.html").read_bytes() == made["html"].read_bytes()
    other = make_report(
        sel, made["root"], made["base"] / "seed1.html", packed=made["base"] / "packed", seed=1
    )
    assert [c.row for c in other.datasets[0].good_cards] != [c.row for c in coyo.good_cards]


def _images(made: dict, name: str) -> list[list[str]]:
    import pyarrow.parquet as pq

    from ovis_data.validate.catalog import catalog_path

    return [x or [] for x in pq.read_table(catalog_path(made["root"], name)).column("images").to_pylist()]


def test_exact_tokens_with_a_tokenizer(made: dict):
    sel = select_datasets(None, ["coyo-10m", "allava-evol-instruct-143k"], None, None)
    report = make_report(
        sel, made["root"], made["base"] / "exact.html", tokenizer=Path(qwen_path()), samples=1
    )
    approx = make_report(sel, made["root"], made["base"] / "approx.html", samples=1)
    for d, a in zip(report.datasets, approx.datasets, strict=True):
        tokens, rough = d.histograms[0], a.histograms[0]
        assert tokens.note.startswith("exact") and rough.note.startswith("approximate")
        assert tokens.summary["n"] == d.good  # every good sample counted once
        # the template's own tokens (role headers, "'s caption: ") come on top of the text
        assert tokens.summary["min"] > 0 and tokens.summary["max"] > rough.summary["max"] // 2
    card = report.datasets[0].good_cards[0]
    assert card.length > card.supervised > 0 and any(s.get("supervised") for s in card.segments)
    assert card.pictures[0].uri.startswith("data:image/jpeg;base64,")


def test_validate_and_pack_end_with_the_report_command(made: dict):
    """Both commands, in this process (typer's runner): validate one dataset again, pack the same stage
    again (nothing to do: the manifest is current)."""
    from typer.testing import CliRunner

    from ovis_data.cli import app

    root, packed_out = made["root"], made["base"] / "packed"
    runner = CliRunner()
    validated = runner.invoke(app, ["validate", "geo-177k", "--root", str(root), "--meta-only"])
    assert validated.exit_code == 1, validated.output  # it has a bad sample, and says so
    assert f"ovis-data report geo-177k --root {root} --out report.html" in validated.output
    packed = runner.invoke(
        app,
        ["pack", "--recipe", str(made["recipe"]), "--root", str(root), "--tokenizer", qwen_path(),
         "--out", str(packed_out), "--processes", "1", "--packs-per-shard", "4", "--quiet"],
    )  # fmt: skip
    assert packed.exit_code == 0, packed.output
    hint = f"ovis-data report --recipe {made['recipe']} --root {root} --packed {packed_out} --out report.html"
    assert hint in packed.output


def test_usage_errors_are_one_line(made: dict, tmp_path: Path):
    root = made["root"]
    for args, words in [
        (["--stage", "3", "geo-177k"], "give one of --stage N, dataset names, or --recipe FILE"),
        (["scienceqa-train-val-17k"], "run `ovis-data validate` first"),
    ]:  # as users meet them: one line on stderr, exit 2
        r = run_cli("report", *args, "--root", str(root), "--out", str(tmp_path / "x.html"))
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    with pytest.raises(OvisDataError, match="coyo-11m"):
        select_datasets(None, ["coyo-11m"], None, None)
    geo = select_datasets(None, ["geo-177k"], None, None)
    with pytest.raises(OvisDataError, match=r"--packed .*: no .*manifest.json"):
        make_report(geo, root, tmp_path / "x.html", packed=tmp_path)
    with pytest.raises(OvisDataError, match="--samples"):
        make_report(geo, root, tmp_path / "x.html", samples=-1)
    assert not (tmp_path / "x.html").exists()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed ({CHROMIUM}): apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield b
        b.close()


def test_the_report_in_a_real_browser(made: dict, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on(
        "console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
    page.goto(made["html"].as_uri(), wait_until="load")
    assert problems == [] and outside == []
    headings = page.eval_on_selector_all("h2", "els => els.map(e => e.textContent)")
    assert set(DATASETS) <= set(headings)
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.alt, e.complete, e.naturalWidth])")
    assert len(images) >= 10
    assert all(complete and width > 0 for _, complete, width in images), images
    assert {alt for alt, _, _ in images} & {"truncated_00002.jpg"} == set(), "a truncated image is not drawn"
    charts = page.eval_on_selector_all("svg.chart", "els => els.map(e => e.getBBox().height)")
    # per dataset: tokens, images per sample, sizes (+ turns for conversations); the packed stage's three
    assert len(charts) >= 3 * len(DATASETS) + 3 and all(h > 0 for h in charts)
    bars = page.eval_on_selector_all("svg.chart rect", "els => els.length")
    assert bars > 50
    assert page.locator("span.sup").count() > 0, "supervised text is marked"
    body = page.inner_text("body")
    for words in (
        "decompression_bomb",
        "over the pixel limit",
        "unsafe_path",
        "missing_image",
        "no such file",
    ):
        assert words in body, words
    page.close()
