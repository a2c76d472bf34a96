"""The chat page (Gradio): upload images, ask, watch the answer stream in, keep talking, clear; the
generation settings in a fold. It runs through the same queue as the API."""

from __future__ import annotations

import queue as queue_mod
from collections.abc import Iterator
from typing import Any

from PIL import Image

from ..chat import ChatError, build_query
from .messages import ApiError, Limits, decode_image
from .worker import GenerationQueue, QueueFull

CSS = "footer {display: none !important}"


def _open(path: str, limits: Limits) -> Image.Image:
    name = path.rsplit("/", 1)[-1]
    try:
        with open(path, "rb") as f:
            data = f.read(limits.max_image_bytes + 1)
    except OSError as e:
        raise ChatError(f"{name}: cannot read the upload ({e})") from e
    if len(data) > limits.max_image_bytes:
        raise ChatError(f"{name}: over the limit of {limits.max_image_bytes:,} bytes")
    try:
        return decode_image(data, name, limits)
    except ApiError as e:
        raise ChatError(e.message) from e


def build_page(queue: GenerationQueue, model_name: str, default_max_tokens: int, limits: Limits) -> Any:
    """The gr.Blocks of the page."""
    import gradio as gr

    runner = queue.runner

    def respond(
        message: dict,
        turns: list[dict],
        chat: list[dict],
        max_new_tokens: float,
        temperature: float,
        top_p: float,
        seed: float | None,
        stop_on_repetition: bool,
    ) -> Iterator[tuple]:
        """One exchange: the question (and its images) shown at once, then the answer as it grows."""
        text = (message or {}).get("text", "") or ""
        paths = [f if isinstance(f, str) else f.get("path") for f in (message or {}).get("files", [])]
        if not text.strip() and not paths:
            raise gr.Error("Type a question (and add images if you like).")
        try:
            images = [_open(p, limits) for p in paths]
            all_images = [im for t in turns for im in t["images"]] + images
            history = [(t["query"], t["answer"]) for t in turns]
            prepared = runner.prepare(all_images, text, history)
        except ChatError as e:
            raise gr.Error(str(e)) from e
        generation: dict[str, Any] = {
            "max_new_tokens": int(max_new_tokens),
            "do_sample": temperature > 0,
            "stop_on_repetition": bool(stop_on_repetition),
            "seed": None if seed is None else int(seed),
        }
        if temperature > 0:
            generation.update(temperature=float(temperature), top_p=float(top_p))
        pieces: queue_mod.Queue = queue_mod.Queue()
        try:
            job = queue.submit(prepared, on_text=pieces.put, **generation)
        except (QueueFull, ChatError) as e:
            raise gr.Error(str(e)) from e
        job.future.add_done_callback(lambda _: pieces.put(None))
        user_content: list[Any] = [{"path": p} for p in paths] + ([text] if text else [])
        chat = [*chat, {"role": "user", "content": user_content}, {"role": "assistant", "content": ""}]
        answer = ""
        try:
            yield gr.MultimodalTextbox(value=None, interactive=False), turns, chat, ""
            while (piece := pieces.get()) is not None:
                answer += piece
                chat[-1] = {"role": "assistant", "content": answer}
                yield gr.MultimodalTextbox(), turns, chat, ""
            result = job.future.result()
            if result is None:
                return
            chat[-1] = {"role": "assistant", "content": result.output}
            turns = [
                *turns,
                {"query": build_query(text, len(images)), "answer": result.output, "images": images},
            ]
            note = f"{result.output_tokens} tokens; {result.prompt_tokens} in the prompt"
            if result.finish_reason == "repetition":
                note += " (cut: the answer began to repeat itself)"
            elif result.finish_reason == "length":
                note += " (stopped at max new tokens)"
            yield gr.MultimodalTextbox(value=None, interactive=True), turns, chat, note
        finally:
            job.cancel.set()  # the page was closed or Stop pressed: the model moves on

    with gr.Blocks(title=f"Ovis chat: {model_name}") as page:
        gr.Markdown(f"### Ovis chat · `{model_name}`")
        chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="conversation")
        box = gr.MultimodalTextbox(
            file_types=["image"],
            file_count="multiple",
            sources=["upload"],
            placeholder="Ask about your images (attach them with the clip)...",
            show_label=False,
            elem_id="question",
        )
        status = gr.Markdown("", elem_id="status")
        with gr.Row():
            clear = gr.Button("Clear conversation", elem_id="clear")
        with gr.Accordion("Generation settings", open=False):
            max_new = gr.Slider(1, 4096, value=default_max_tokens, step=1, label="Max new tokens")
            temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0: greedy decoding)")
            top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top p (when sampling)")
            seed = gr.Number(value=0, precision=0, label="Seed (when sampling)")
            repetition = gr.Checkbox(value=True, label="Stop when the answer starts repeating itself")
        turns = gr.State([])
        box.submit(
            respond,
            [box, turns, chatbot, max_new, temperature, top_p, seed, repetition],
            [box, turns, chatbot, status],
        ).then(lambda: gr.MultimodalTextbox(interactive=True), None, box)
        clear.click(lambda: (None, [], [], ""), None, [box, turns, chatbot, status])
    return page


def page_style() -> dict[str, Any]:
    """Theme and CSS, which Gradio 6 takes where the page is mounted. Local fonts only: the page loads
    nothing from elsewhere (the default theme would fetch Google's)."""
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["monospace"])
    return {"theme": theme, "css": CSS}
