"""The demo pipeline on the built-in corpus: corpus on a local Hub -> get (and fetch) -> validate -> pack
(3 stages) -> tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.console import Console

from ovis_data.fetch import FetchOptions, NetParams
from ovis_data.get import GetOptions, Hub, get
from ovis_data.get.demo_hub import demo_hub
from ovis_data.get.report import summary_table as get_summary
from ovis_data.pack.stage import pack_stage
from ovis_data.pack.tokenize import bundled_qwen_tokenizer_dir
from ovis_data.registry import load_registry
from ovis_data.report.build import make_report, select_datasets
from ovis_data.validate.bad_samples_report import summary_table, write_report
from ovis_data.validate.dataset import validate_dataset

# Steps per stage and learning rates: a global batch of 8 samples and high rates make the tiny model's
# loss fall within seconds on one CPU; the recipes' values (8192 / 1024 samples, 1e-4 / 2e-5) are for
# real runs.
DEMO_STEPS = 8
DEMO_LR = {1: 0.05, 2: 0.02, 3: 0.005}
DEMO_HOLDOUT = 0.15  # of each dataset's samples packed into OUT/stageN/val/: each stage logs a val_loss


def _train_and_chat(
    out: Path, root: Path, seed: int, steps: int, console: Console
) -> tuple[dict[int, list[float]], tuple[str, str]]:
    """Each stage through the trainer as users run it (stage 1 from a tiny LLM + ViT, each next stage from
    the last one's model folder), then one question about an image to the final model."""
    import json

    from transformers.utils import logging as hf_logging

    from ovis_model.chat import chat
    from ovis_model.modeling import Ovis
    from ovis_model.tiny import write_tiny_parts
    from ovis_model.train.loop import train
    from ovis_model.train.setup import RunArgs

    if not console.is_terminal:  # its "Writing model shards" bars would fill a log
        hf_logging.disable_progress_bar()

    # the real recipes' image geometry (336 px, 578 visual tokens) on a 2-layer, 32-wide ViT and LLM
    llm, vit = write_tiny_parts(out / "parts", image_size=336, seed=seed, initializer_range=0.3)
    losses = {}
    for stage in (1, 2, 3):
        overrides = [
            "model.visual_vocab_size=64",
            "train.global_batch_samples=8",
            "train.gradient_checkpointing=false",
            "train.num_workers=0",  # batches read here: a worker is a fresh Python + torch, per stage
            f"train.lr={DEMO_LR[stage]}",
            "train.lr_by_family={}",
            "train.warmup_ratio=0.0",
            f"train.seed={seed}",
            f"train.log_every={steps}",
        ]
        args = RunArgs(
            data=out / "packed",
            out=out / "run",
            stage=stage,
            llm=llm if stage == 1 else None,
            vit=vit if stage == 1 else None,
            max_steps=steps,
            micro_batch_tokens=2048,
            overrides=overrides,
        )
        train(args, say=lambda text: console.print(text, highlight=False, soft_wrap=True))
        lines = (out / "run" / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()
        losses[stage] = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
    model = Ovis.from_pretrained(out / "run" / "stage3" / "model")
    # the image asked about, at a short path, so the suggested ovis-chat command runs as written
    image = shutil.copyfile(next(p for p in sorted((root / "images").rglob("*.jpg"))), out / "example.jpg")
    result = chat(model, str(image), "Describe the image.", max_new_tokens=12)
    return losses, (str(image), result.output)


def _evaluate(out: Path, root: Path, registry: dict, seed: int, console: Console) -> None:
    """A VLMEvalKit-format bench from the stage-3 conversations, scored as `ovis-eval` scores it."""
    from ovis_data.demo_bench import write_demo_bench
    from ovis_data.recipes import load_recipe
    from ovis_model.eval.generate import model_answerer
    from ovis_model.eval.score import evaluate_bench
    from ovis_model.model_dir import load_for_chat

    bench = out / "demo_bench.tsv"
    specs = [registry[m.name] for m in load_recipe(3, registry).datasets]
    n = write_demo_bench(root, specs, bench, seed=seed)
    model_dir = out / "run" / "stage3" / "model"
    summary = evaluate_bench(bench, out / "eval", model_answerer(load_for_chat(model_dir), 8))
    val = [
        json.loads((out / "run" / f"stage{s}" / "summary.json").read_text())["val_loss"] for s in (1, 2, 3)
    ]
    losses = ", ".join(f"{v:.3f}" for v in val if v is not None)
    verdict = (
        "none of its answers names an option (each counted wrong, never guessed)"
        if summary["unmatched"] == summary["questions"]
        else f"{summary['unmatched']} of its answers name no option (counted wrong, never guessed)"
    )
    console.print(
        f"val_loss (held-out samples) after stages 1-3: {losses}; {n} questions from the corpus (4 options "
        f"each, chance {summary['chance']:.0%}): accuracy {summary['accuracy']:.0%}; {verdict}. A model this "
        "small is at chance or below; a real Ovis is scored the same way on MMBench, MMStar and the others "
        "(docs/evaluation.md):"
        f"\n  ovis-eval {model_dir} --bench {bench} --out {out / 'eval'}",
        soft_wrap=True,
        highlight=False,
    )


def run_demo(
    out: Path,
    seed: int = 0,
    console: Console | None = None,
    processes: int | None = None,
    train_steps: int = DEMO_STEPS,
) -> str:
    console = console or Console()
    out = Path(out)
    root = out / "data"
    hub = out / "hub"  # the demo corpus published as Hub repositories and plain files, served locally
    for stale in (root, hub, out / "web", out / "packed", out / "run", out / "parts"):
        if stale.exists():
            shutil.rmtree(stale)
    registry = load_registry()
    step = 0

    def header(text: str) -> None:
        nonlocal step
        step += 1
        console.print(f"\n[bold]{step}/6[/] {text}", soft_wrap=True)

    header(f"publishing a demo corpus of all {len(registry)} datasets on a local Hub-compatible server")
    with demo_hub(hub, seed=seed) as (server, info):
        header(
            f"getting it with ovis-data get from {server.url} (as HF_ENDPOINT) into {root}: meta files, "
            "archives verified and extracted, URL datasets' images through fetch"
        )
        # The image URLs are on loopback, which fetch refuses by default: the demo lifts that, as a user
        # would.
        options = FetchOptions(net=NetParams(allow_private=True), processes=processes or 0)
        sources = load_registry(info)
        got = get(list(sources.values()), root, GetOptions(hub=Hub(server.url, token=False)), None, options,
                  sources, console)  # fmt: skip
        console.print(get_summary(got.results, got.gaps))

    header("validating it (every image's header read)")
    results = [validate_dataset(spec, root, processes=processes) for spec in registry.values()]
    console.print(summary_table(results))
    write_report(out / "validate_report.json", results, root, None)

    tokenizer = bundled_qwen_tokenizer_dir()
    header(f"packing stages 1-3 with the Qwen2.5 tokenizer into {out / 'packed'}")
    manifests = {}
    for stage in (1, 2, 3):
        m = pack_stage(
            stage,
            root,
            tokenizer,
            out / "packed",
            seed=seed,
            processes=processes,
            registry=registry,
            holdout=DEMO_HOLDOUT,
        )
        manifests[stage] = m
        console.print(
            f"stage {stage}: {m['samples']} samples -> {m['records']} packed sequences of "
            f"{m['capacity']} tokens in {len(m['shards'])} shard(s), fill {m['fill']:.1%}, "
            f"dropped {m['dropped'] or 'none'}",
            soft_wrap=True,
        )
        per_sample = m["fill"] * m["capacity"] * m["records"] / max(m["samples"], 1)
        if per_sample > m["capacity"] / 2:  # stage 1: 578 visual tokens + a caption, 1024 tokens a sequence
            image = m["visual_tokens_per_image"]
            console.print(
                f"  (a sample here is ~{per_sample:.0f} tokens, its image alone {image}: only one fits in "
                f"{m['capacity']}, so the fill is low by construction; the recipe's max_length sets it)",
                soft_wrap=True,
                highlight=False,
            )

    header("a tiny Ovis trains each stage with ovis-train (DeepSpeed, one CPU process), then answers")
    losses, answer = _train_and_chat(out, root, seed, train_steps, console)
    for stage, values in losses.items():
        console.print(f"stage {stage}: loss {values[0]:.3f} -> {values[-1]:.3f} over {len(values)} steps")
    console.print(
        "The loss (cross-entropy per supervised token, in nats: a uniform guess over Qwen2.5's 151k-token "
        "vocabulary scores ln 151,665 = 11.9, a random start about that or worse) should fall at every "
        "stage: a model this small memorises the tiny corpus (real runs go far lower over thousands of "
        "steps). In stages 1 and 2 only the visual tokenizer and its embedding table "
        "learn, the LLM stays frozen, so the loss moves less than in stage 3, where everything trains.",
        soft_wrap=True,
    )
    console.print(
        f"Its answer about {answer[0]}: {answer[1]!r} (a 2-layer, 32-wide model trained for seconds: a few "
        "words from the corpus, not sense; a real Ovis describes the image).",
        soft_wrap=True,
    )

    # the data at a glance: stage 3's datasets and its packed shards, one HTML page
    stage3 = select_datasets(3, None, None, None)
    make_report(stage3, root, out / "report.html", packed=out / "packed", seed=seed)

    header("scoring the final model with ovis-eval on a small multiple-choice bench made from the corpus")
    _evaluate(out, root, registry, seed, console)

    good = sum(r.good for r in results)
    bad = sum(r.bad for r in results)
    records = sum(m["records"] for m in manifests.values())
    return (
        f"\ndemo done: {good} good samples, {bad} deliberately broken ones caught (report: "
        f"{out / 'validate_report.json'}); {records} packed sequences in {out / 'packed'}; runs in "
        f"{out / 'run'}.\nLook at the data in a browser: {out / 'report.html'}\n"
        f"Look inside a shard: ovis-data inspect "
        f"{out / 'packed' / 'stage3' / 'stage3-00000.tar'}\n"
        f"Ask the model: ovis-chat {out / 'run' / 'stage3' / 'model'} -i {out / 'example.jpg'} "
        '"Describe the image."'
    )
