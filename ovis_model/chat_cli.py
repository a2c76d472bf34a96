"""`ovis-chat MODEL_DIR --image FILE "question"`: ask a trained Ovis directory about images."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def chat_command(
    model_dir: Path = typer.Argument(
        ..., exists=True, file_okay=False, help="a model directory (save_pretrained)"
    ),
    question: str = typer.Argument(
        ..., help="the question; `<image>` markers place the images, else they lead"
    ),
    image: list[Path] = typer.Option([], "--image", "-i", exists=True, dir_okay=False, help="image file(s)"),
    max_new_tokens: int = typer.Option(512, help="generation budget"),
    sample: bool = typer.Option(False, "--sample/--greedy", help="sample instead of greedy decoding"),
    temperature: float = typer.Option(1.0, help="sampling temperature"),
    top_p: float | None = typer.Option(None, help="nucleus sampling threshold"),
    top_k: int | None = typer.Option(None, help="top-k sampling"),
    seed: int | None = typer.Option(None, help="random seed for sampling"),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda if present)"),
    dtype: str | None = typer.Option(None, help="bfloat16, float16 or float32 (default: bf16 on cuda)"),
    as_json: bool = typer.Option(False, "--json", help="print prompt, output and token counts as JSON"),
) -> None:
    """Answer QUESTION about the images with the model in MODEL_DIR."""
    from .chat import chat, load_for_chat

    model = load_for_chat(model_dir, device=device, dtype=dtype)
    result = chat(
        model,
        [str(p) for p in image],
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
