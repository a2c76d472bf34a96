"""Generation prompts for `chat`, rendered by the very chat formats the pack stage trains with.

One source of truth: `ovis_data.templates` renders the turns and `ovis_data.tokenize` tokenizes them
(each turn on its own, split at `<image>`, one `-200` per image), exactly as packed samples were.
"""

from __future__ import annotations

from typing import Any

from ovis_data.errors import OvisDataError
from ovis_data.templates import FIXED_FORMATS, ChatFormat, Turn, detect_chat_format
from ovis_data.tokenize import SampleEncoder

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


def generation_prompt(
    tokenizer: Any, template: str, query: str, system: str | None = None
) -> tuple[str, list[int]]:
    """(prompt text, ids): the system turn (the format's default unless given), the user's query, then
    an open assistant header."""
    if template not in FORMATS:
        raise ValueError(f"unknown chat template {template!r}; known: {sorted(FORMATS)}")
    fmt = FORMATS[template]
    roles, texts = (["system", "human"], [system, query]) if system is not None else (["human"], [query])
    turns = [*fmt.render(roles, texts), Turn(fmt.roles["gpt"])]
    ids, _ = SampleEncoder(tokenizer, fmt).encode_turns([turns]).sample(0)
    return "".join(t.text for t in turns), ids.tolist()
