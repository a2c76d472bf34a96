"""Generation prompts for `chat`, rendered by the very chat formats the pack stage trains with.

One source of truth: `ovis_data.templates` (OVIS_V1.md section 3). Each turn is tokenized on its own,
split only at `<image>`, with `add_special_tokens=False`, and the pieces are joined with one `-200` per
image, exactly as packed training samples were.
"""

from __future__ import annotations

from typing import Any

from ovis_data.errors import OvisDataError
from ovis_data.templates import FIXED_FORMATS, ChatFormat, detect_chat_format

from .constants import IMAGE_TOKEN, IMAGE_TOKEN_ID

FORMATS: dict[str, ChatFormat] = FIXED_FORMATS


def stop_token(fmt: ChatFormat) -> str:
    """The token that ends an assistant turn (the turn end without its trailing newline)."""
    return fmt.turn_end.rstrip("\n")


def detect_template(tokenizer: Any) -> str | None:
    """The chat format family from the tokenizer's special tokens, or None when unknown."""
    try:
        fmt = detect_chat_format(tokenizer, "auto")
    except OvisDataError:
        return None
    return fmt.name if fmt.name in FORMATS else None


def tokenize_with_images(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with one `-200` per `<image>`, the pieces tokenized separately."""
    ids: list[int] = []
    for i, piece in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            ids.append(IMAGE_TOKEN_ID)
        if piece:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids


def generation_prompt(
    tokenizer: Any, template: str, query: str, system: str | None = None
) -> tuple[str, list[int]]:
    """(prompt text, ids): the system turn (the format's default unless given), the user's query, then
    an open assistant header."""
    if template not in FORMATS:
        raise ValueError(f"unknown chat template {template!r}; known: {sorted(FORMATS)}")
    fmt = FORMATS[template]
    roles, texts = (["system", "human"], [system, query]) if system is not None else (["human"], [query])
    turns = [t.text for t in fmt.render(roles, texts)] + [fmt.roles["gpt"]]
    ids = [i for turn in turns for i in tokenize_with_images(tokenizer, turn)]
    return "".join(turns), ids
