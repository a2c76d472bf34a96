"""`ovis-chat MODEL_DIR -i FILE "question"`: ask a trained Ovis model folder about images; `--serve` for a
chat page and an OpenAI-compatible API."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from ovis_data.clikit import hf_bars_only_on_a_terminal, run, version_option
from ovis_data.errors import OvisDataError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

ENDINGS = {
    "repetition": "cut when the answer began repeating itself (--no-stop-on-repetition lets it run)",
    "length": "stopped at --max-new-tokens",
    "stop": "the model ended its answer",
}


@app.command()
def chat_command(
    model_dir: Annotated[
        Path,
        typer.Argument(metavar="MODEL_DIR", help="A model folder written by ovis-train (RUN/stageN/model)."),
    ],
    question: Annotated[
        str | None,
        typer.Argument(
            metavar="QUESTION",
            help="The question; `<image>` markers place the images, else they lead. Not with --serve.",
        ),
    ] = None,
    image: Annotated[
        list[Path] | None, typer.Option("--image", "-i", metavar="FILE", help="An image (repeat for more).")
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option(metavar="N", help="Generation budget (the page's and the API's default).")
    ] = 512,
    sample: Annotated[
        bool, typer.Option("--sample/--greedy", help="Sample instead of greedy decoding.")
    ] = False,
    temperature: Annotated[float, typer.Option(metavar="T", help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float | None, typer.Option(metavar="P", help="Nucleus sampling threshold.")] = None,
    top_k: Annotated[int | None, typer.Option(metavar="K", help="Top-k sampling.")] = None,
    seed: Annotated[int | None, typer.Option(metavar="N", help="Random seed for sampling.")] = None,
    stop_on_repetition: Annotated[
        bool,
        typer.Option(
            "--stop-on-repetition/--no-stop-on-repetition",
            help="Cut an answer whose last 64 tokens repeat a short cycle (a loop), instead of looping on.",
        ),
    ] = True,
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
    serve: Annotated[
        bool, typer.Option("--serve", help="Serve a chat page and an OpenAI-compatible API (needs [serve]).")
    ] = False,
    host: Annotated[
        str, typer.Option(metavar="HOST", help="--serve: the address to listen on.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="--serve: the port to listen on.")] = 7860,
    model_name: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="--serve: the API's model name (default: MODEL_DIR as given)."),
    ] = None,
    queue_size: Annotated[
        int, typer.Option(metavar="N", help="--serve: requests that may wait for the model; more get 503.")
    ] = 8,
    max_image_mb: Annotated[
        float, typer.Option(metavar="MB", help="--serve: the largest image file accepted.")
    ] = 20.0,
    allow_remote_images: Annotated[
        bool, typer.Option("--allow-remote-images", help="--serve: fetch http(s) image URLs of API requests.")
    ] = False,
    version: Annotated[bool, version_option("ovis-chat")] = False,
) -> None:
    """Answer QUESTION about the images with the Ovis model in MODEL_DIR (greedy unless --sample), or
    serve it: a chat page at http://HOST:PORT/ and an OpenAI-compatible API at http://HOST:PORT/v1.

    Examples (after ovis-data demo: its final model and the image it asked about):
        ovis-chat demo_out/run/stage3/model -i demo_out/example.jpg "Describe the image."
        ovis-chat demo_out/run/stage3/model --serve --port 7860
    """
    from .chat import ChatError, load_images

    if serve:
        if question is not None or image:
            raise ChatError("--serve takes no QUESTION or --image: ask on the page or through the API")
        _check_serve(host, port, queue_size, max_image_mb)
    elif question is None:
        raise ChatError("QUESTION is required (or --serve for the page and the API); see ovis-chat --help")
    images = load_images([str(p) for p in image or []])  # a bad image fails before the model loads
    hf_bars_only_on_a_terminal()
    from .runner import OvisRunner

    runner = OvisRunner(model_dir, device=device, dtype=dtype)
    if serve:
        from .serve.app import ServeOptions
        from .serve.app import serve as serve_model
        from .serve.messages import Limits

        limits = Limits(max_image_bytes=int(max_image_mb * 2**20), allow_remote_images=allow_remote_images)
        options = ServeOptions(host, port, model_name or str(model_dir), queue_size, max_new_tokens, limits)
        serve_model(runner, options)
        return
    start = time.perf_counter()
    result = runner.run(
        images,
        question,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop_on_repetition=stop_on_repetition,
    )
    seconds = time.perf_counter() - start
    if as_json:
        payload = {**result.__dict__, "total_tokens": result.total_tokens}
        typer.echo(json.dumps(payload, ensure_ascii=False, indent=2))
    else:
        typer.echo(result.output)
    print(
        f"ovis-chat: {result.output_tokens} tokens in {seconds:.1f} s; {ENDINGS[result.finish_reason]}",
        file=sys.stderr,
    )


def _check_serve(host: str, port: int, queue_size: int, max_image_mb: float) -> None:
    """Usage errors of --serve before the model loads: Gradio present, the port free, sane limits."""
    from .chat import ChatError

    if queue_size < 0 or max_image_mb <= 0:
        raise ChatError("--queue-size must be >= 0 and --max-image-mb > 0")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ChatError("--serve needs Gradio: pip install 'ovis-toolkit[serve]'") from None
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ChatError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None


def main() -> NoReturn:
    from .chat import ChatError

    run(app, "ovis-chat", (ChatError, OvisDataError), on_interrupt="interrupted")


if __name__ == "__main__":
    main()
