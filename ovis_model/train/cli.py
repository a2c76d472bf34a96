"""`ovis-train`: argument parsing only; the work is `ovis_model.train.loop.train`."""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from ovis_data.clikit import (
    expect_dir,
    expect_dir_or_creatable,
    expect_file,
    hf_bars_only_on_a_terminal,
    run,
    version_option,
)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def train_command(
    data: Annotated[
        str,
        typer.Option(
            "--data", help="Packed data: OUT of `ovis-data pack` (or OUT/stageN), a folder or s3://..."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Run folder: this stage writes RUN/stageN/.")],
    stage: Annotated[
        int | None, typer.Option("--stage", help="Train with the shipped recipe pipelines/stageN.toml.")
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe", metavar="FILE", help="Train with your own recipe (its `stage` names RUN/stageN)."
        ),
    ] = None,
    llm: Annotated[
        Path | None, typer.Option("--llm", help="Base LLM folder (stage 1).", metavar="DIR")
    ] = None,
    vit: Annotated[
        Path | None, typer.Option("--vit", help="Base ViT folder (stage 1).", metavar="DIR")
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(
            "--init", metavar="DIR", help="Start from this model folder (default: RUN/stage{N-1}/model)."
        ),
    ] = None,
    max_steps: Annotated[
        int | None,
        typer.Option("--max-steps", metavar="K", help="Stop after K steps (the schedule's length)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint in RUN/stageN.")
    ] = False,
    micro_batch_tokens: Annotated[
        int | None,
        typer.Option(
            "--micro-batch-tokens", metavar="T", help="Tokens per micro-batch (default: the recipe's, 16384)."
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set", metavar="KEY=VALUE", help="Override the recipe: train.lr=1e-5, model.KEY=..., ..."
        ),
    ] = None,
    dataset_info: Annotated[
        Path | None,
        typer.Option(
            "--dataset-info",
            metavar="FILE",
            help="Your own dataset_info.json: a recipe's datasets are looked up in it, then the shipped.",
        ),
    ] = None,
    verify_data: Annotated[
        bool,
        typer.Option(
            "--verify-data",
            help="Also check every shard's sha256 against the manifest before training (sizes always are).",
        ),
    ] = False,
    local_rank: Annotated[int | None, typer.Option("--local_rank", hidden=True)] = None,  # deepspeed launcher
    version: Annotated[bool, version_option("ovis-train")] = False,
) -> None:
    """Train one stage of Ovis on packed shards with DeepSpeed, as the stage's recipe says.

    Stage 1 builds the model from a base LLM and ViT; stages 2 and 3 start from the previous stage's model
    folder. Checkpoints go to RUN/stageN/checkpoints (every train.save_every steps and on SIGTERM), metrics
    to RUN/stageN/metrics.jsonl and tensorboard/, the final model to RUN/stageN/model.

    Examples (stage 1 from a base LLM and ViT; stage 2 from stage 1's model; a short try on the demo's data):
        ovis-train --stage 1 --data /data/packed --out /runs/ovis --llm /models/qwen2.5 --vit /models/clip
        ovis-train --stage 2 --data /data/packed --out /runs/ovis
        ovis-train --stage 3 --data demo_out/packed --out demo_out/run --max-steps 4

    On 8 GPUs: torchrun --nproc_per_node 8 -m ovis_model.train --stage 3 --data /data/packed --out /runs/ovis

    Your own datasets (docs/own-datasets.md):
        ovis-train --recipe my_recipe.toml --dataset-info my_info.json --data /data/packed --out /runs/mine
    """
    for path, option in ((recipe, "--recipe"), (dataset_info, "--dataset-info")):
        expect_file(path, option)
    expect_dir(data, "--data")
    expect_dir_or_creatable(out, "--out")
    from .diskfull import DiskFullError
    from .loop import train
    from .setup import RunArgs, TrainError, close_distributed

    args = RunArgs(
        data=data,
        out=out,
        stage=stage,
        recipe=recipe,
        llm=llm,
        vit=vit,
        init=init,
        max_steps=max_steps,
        resume=resume,
        micro_batch_tokens=micro_batch_tokens,
        overrides=list(overrides or []),
        dataset_info=dataset_info,
        verify_data=verify_data,
    )
    hf_bars_only_on_a_terminal()
    try:
        train(args, say=lambda text: print(text, flush=True))
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except DiskFullError as e:  # checkpoints written so far stay resumable
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # a full disk elsewhere (metrics, TensorBoard): one line too
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(
            f"error: {e.filename or out}: no space left on device: free space or move --out", file=sys.stderr
        )
        sys.exit(1)
    close_distributed()  # a finished run only: after an error, a rank may still wait in a collective


def main() -> NoReturn:
    run(app, "ovis-train", (), on_interrupt="interrupted; --resume continues from the last checkpoint")


if __name__ == "__main__":
    main()
