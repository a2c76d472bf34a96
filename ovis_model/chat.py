"""Chat helpers (results, images, the query) and `chat()`, a one-call front of `ovis_model.runner`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from .constants import IMAGE_TOKEN


class ChatError(ValueError):
    """A model folder, image or question that cannot be used: ovis-chat prints it as one line."""


@dataclass
class ChatResult:
    prompt: str
    output: str
    prompt_tokens: int  # after image expansion, as the LLM sees it
    output_tokens: int  # the stop token included
    finish_reason: str = "stop"  # "stop" (a stop token), "length", "repetition" (a loop cut), "cancelled"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


def load_images(images: Any) -> list[Image.Image]:
    """PIL images from paths (or images), decoded now: a bad file is a ChatError naming it."""
    if images is None:
        return []
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    return [im if isinstance(im, Image.Image) else _open_image(im) for im in images]


def _open_image(path: str | Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise ChatError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise ChatError(f"{path}: a folder, not an image file") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # SyntaxError: some malformed headers
        raise ChatError(f"{path}: not a readable image ({e})") from e
    return image


def build_query(text: str, n_images: int) -> str:
    """v1's query: `"<image> " + text` per image, unless the text already places its `<image>` markers."""
    n_markers = text.count(IMAGE_TOKEN)
    if n_markers == 0:
        return "<image> " * n_images + text
    if n_markers != n_images:
        raise ChatError(f"the text has {n_markers} {IMAGE_TOKEN} markers but {n_images} images were given")
    return text


def chat(
    model,  # noqa: ANN001 (Ovis; imported lazily to avoid a cycle)
    images: Any,
    text: str,
    max_new_tokens: int = 512,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    system: str | None = None,
    seed: int | None = None,
    **generation: Any,
) -> ChatResult:
    """Answer `text` about `images` (PIL images or paths, or None): greedy by default, sampling if asked.
    `OvisRunner(model).run(...)`; see `ovis_model.runner` for the other settings and for batches."""
    from .runner import OvisRunner  # the runner imports this module's helpers

    return OvisRunner(model).run(
        images,
        text,
        system=system,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        **generation,
    )
