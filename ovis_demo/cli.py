"""`ovis-data demo`: the whole pipeline on the built-in corpus, on one CPU, in minutes.

Registered on `ovis-data` through the `ovis_data.commands` entry point (pyproject.toml): the demo drives
both ovis_data and ovis_model, so it sits above them and ovis_data never imports it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ovis_data.cli.app import app
from ovis_data.cli.common import console
from ovis_data.clikit import expect_dir_or_creatable

from .run import DEMO_STEPS, run_demo


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo corpus and everything made from it.")] = Path(
        "demo_out"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the corpus, the packing and the tiny model.")] = 0,
    processes: Annotated[int | None, typer.Option(help="Worker processes (default: all cores).")] = None,
    train_steps: Annotated[int, typer.Option(help="Training steps per stage.")] = DEMO_STEPS,
) -> None:
    """Run the whole pipeline on a built-in corpus of all 19 datasets, on one CPU, in minutes.

    Builds the corpus (with deliberately broken samples: the summary shows each one with its reason),
    validates it, packs stages 1-3 with the real Qwen2.5 tokenizer, trains a tiny Ovis on each stage's
    shards with ovis-train (DeepSpeed on one CPU process; stage 1 from a tiny LLM and ViT, each next stage
    from the last one's model), and asks the final model about an image.

    Examples (everything in demo_out/; a quicker try with fewer training steps):
        ovis-data demo
        ovis-data demo --out /tmp/ovis-demo --train-steps 4
    """
    expect_dir_or_creatable(out, "--out")
    summary = run_demo(out, seed=seed, console=console, processes=processes, train_steps=train_steps)
    console.print(summary, soft_wrap=True)
