"""Inference on a trained model directory: the equivalent of the original's `OvisRunner`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from .batching import expand_image_placeholders
from .constants import IMAGE_TOKEN
from .prompt import FORMATS, generation_prompt, stop_ids


class ChatError(ValueError):
    """A model folder, image or question that cannot be used: ovis-chat prints it as one line."""


@dataclass
class ChatResult:
    prompt: str
    output: str
    prompt_tokens: int  # after image expansion, as the LLM sees it
    output_tokens: int

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


@torch.inference_mode()
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
) -> ChatResult:
    """Answer `text` about `images` (PIL images or paths, or None): greedy by default, sampling if asked."""
    tokenizer = model.text_tokenizer
    if tokenizer is None:
        raise ValueError("the model has no text tokenizer: load it with Ovis.from_pretrained(model_dir)")
    template = model.config.conversation_template
    if template is None:
        raise ValueError(f"config.conversation_template is unset; one of {sorted(FORMATS)} or chat_template")
    pil_images = load_images(images)
    prompt, ids = generation_prompt(tokenizer, template, build_query(text, len(pil_images)), system)
    ids_np, _, _ = expand_image_placeholders(ids, [0] * len(ids), [len(ids)], model.num_visual_tokens)

    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype
    input_ids = torch.as_tensor(ids_np, device=device).unsqueeze(0)
    pixel_values = model.image_processor(pil_images).to(device, dtype) if pil_images else None
    model.eval()
    inputs_embeds = model.embed_inputs(input_ids, pixel_values)

    stop = stop_ids(tokenizer, template)
    eos = model.llm.generation_config.eos_token_id
    stop += [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None and e not in stop]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    else:  # keep a checkpoint's sampling defaults from turning greedy decoding into a warning
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    if seed is not None:
        torch.manual_seed(seed)
    output = model.llm.generate(
        inputs_embeds=inputs_embeds,
        attention_mask=torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=device),
        eos_token_id=stop,
        pad_token_id=pad,
        use_cache=True,
        **gen_kwargs,
    )
    new_tokens = output[0].tolist()  # with inputs_embeds only, generate returns just the new tokens
    while new_tokens and new_tokens[-1] == pad and pad not in stop:
        new_tokens.pop()
    text_out = tokenizer.decode(new_tokens, skip_special_tokens=True)
    return ChatResult(prompt, text_out, int(input_ids.shape[1]), len(new_tokens))
