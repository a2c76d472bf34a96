"""The demo pipeline on the built-in corpus: corpus -> fetch -> validate -> pack (3 stages) -> tiny model."""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console

from .demo_corpus import build_demo_corpus
from .fetch import FetchOptions, NetParams, fetch_datasets, serve_directory
from .pack import pack_stage
from .recipes import load_recipe
from .registry import load_registry
from .report import summary_table, write_report
from .tokenize import bundled_qwen_tokenizer_dir
from .validate import validate_dataset


def run_demo(
    out: Path,
    seed: int = 0,
    console: Console | None = None,
    processes: int | None = None,
    train_steps: int = 2,
) -> str:
    console = console or Console()
    out = Path(out)
    root = out / "data"
    web = out / "web"  # what the demo's local image server publishes at its URLs
    for stale in (root, web, out / "packed", out / "model"):
        if stale.exists():
            shutil.rmtree(stale)
    registry = load_registry()
    step = 0

    def header(text: str) -> None:
        nonlocal step
        step += 1
        console.print(f"\n[bold]{step}/5[/] {text}")

    web.mkdir(parents=True)
    with serve_directory(web) as base_url:
        header(f"building the demo corpus of all {len(registry)} datasets in {root}")
        build_demo_corpus(root, seed=seed, url_root=web, base_url=base_url)
        header(f"fetching the URL datasets (coyo-10m, the cc12m pair) from a local server at {base_url}")
        # The server is on loopback, which fetch refuses by default: the demo lifts that, as a user would.
        options = FetchOptions(net=NetParams(allow_private=True), processes=processes or 0)
        fetch_datasets(None, root, options, registry=registry, console=console)

    header("validating it (image headers, all cores)")
    results = [validate_dataset(spec, root, processes=processes) for spec in registry.values()]
    console.print(summary_table(results))
    write_report(out / "validate_report.json", results, root, None)

    tokenizer = bundled_qwen_tokenizer_dir()
    header(f"packing stages 1-3 with the Qwen2.5 tokenizer into {out / 'packed'}")
    manifests = {}
    for stage in (1, 2, 3):
        m = pack_stage(
            stage, root, tokenizer, out / "packed", seed=seed, processes=processes, registry=registry
        )
        manifests[stage] = m
        console.print(
            f"stage {stage}: {m['samples']} samples -> {m['records']} packed sequences of "
            f"{m['capacity']} tokens in {len(m['shards'])} shard(s), fill {m['fill']:.1%}, "
            f"dropped {m['dropped'] or 'none'}"
        )

    header("a tiny Ovis trains a few steps per stage: stage 1 from parts, each next stage from the last")
    from ovis_model.tiny_train import run_tiny_stages  # torch is imported only once the data work is done

    shards = {stage: sorted((out / "packed" / f"stage{stage}").glob("*.tar")) for stage in (1, 2, 3)}
    trainable = {stage: load_recipe(stage, registry).trainable for stage in (1, 2, 3)}
    losses = run_tiny_stages(shards, trainable, out / "model", steps=train_steps, seed=seed)
    for stage, values in losses.items():
        trains = ", ".join(trainable[stage])
        console.print(f"stage {stage}: trains {trains}; loss " + " -> ".join(f"{x:.3f}" for x in values))

    good = sum(r.good for r in results)
    bad = sum(r.bad for r in results)
    records = sum(m["records"] for m in manifests.values())
    return (
        f"\ndemo done: {good} good samples, {bad} deliberately broken ones caught (report: "
        f"{out / 'validate_report.json'}); {records} packed sequences in {out / 'packed'}; models in "
        f"{out / 'model'}.\nLook inside a shard: ovis-data inspect "
        f"{out / 'packed' / 'stage3' / 'stage3-00000.tar'}"
    )
