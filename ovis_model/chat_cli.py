"""`ovis-chat MODEL_DIR -i FILE "question"`: ask a trained Ovis model folder about images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from ovis_data.clikit import hf_bars_only_on_a_terminal, run, version_option
from ovis_data.errors import OvisDataError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def chat_command(
    model_dir: Annotated[
        Path,
        typer.Argument(metavar="MODEL_DIR", help="A model folder written by ovis-train (RUN/stageN/model)."),
    ],
    question: Annotated[
        str,
        typer.Argument(
            metavar="QUESTION", help="The question; `<image>` markers place the images, else they lead."
        ),
    ],
    image: Annotated[
        list[Path] | None, typer.Option("--image", "-i", metavar="FILE", help="An image (repeat for more).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(metavar="N", help="Generation budget.")] = 512,
    sample: Annotated[
        bool, typer.Option("--sample/--greedy", help="Sample instead of greedy decoding.")
    ] = False,
    temperature: Annotated[float, typer.Option(metavar="T", help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float | None, typer.Option(metavar="P", help="Nucleus sampling threshold.")] = None,
    top_k: Annotated[int | None, typer.Option(metavar="K", help="Top-k sampling.")] = None,
    seed: Annotated[int | None, typer.Option(metavar="N", help="Random seed for sampling.")] = None,
    device: Annotated[
        str | None, typer.Option(metavar="DEVICE", help="cuda or cpu (default: cuda if present).")
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(metavar="DTYPE", help="bfloat16, float16 or float32 (default: bfloat16 on cuda)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print prompt, answer and token counts as JSON.")
    ] = False,
    version: Annotated[bool, version_option("ovis-chat")] = False,
) -> None:
    """Answer QUESTION about the images with the Ovis model in MODEL_DIR (greedy unless --sample).

    Example (after ovis-data demo: its final model and the image it asked about):
        ovis-chat demo_out/run/stage3/model -i demo_out/example.jpg "Describe the image."
    """
    from .chat import chat, load_images
    from .model_dir import load_for_chat

    images = load_images([str(p) for p in image or []])  # a bad image fails before the model loads
    hf_bars_only_on_a_terminal()
    model = load_for_chat(model_dir, device=device, dtype=dtype)
    result = chat(
        model,
        images,
        question,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
    )
    if as_json:
        payload = {**result.__dict__, "total_tokens": result.total_tokens}
        typer.echo(json.dumps(payload, ensure_ascii=False, indent=2))
    else:
        typer.echo(result.output)


def main() -> NoReturn:
    from .chat import ChatError

    run(app, "ovis-chat", (ChatError, OvisDataError), on_interrupt="interrupted")


if __name__ == "__main__":
    main()
