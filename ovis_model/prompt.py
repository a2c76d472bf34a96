"""Generation prompts for `chat`, rendered by the very chat formats the pack stage trains with.

One source of truth: `ovis_data.pack.templates` renders the turns and `ovis_data.pack.tokenize` tokenizes them
(each turn on its own, split at `<image>`, one `-200` per image), exactly as packed samples were.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ovis_data.errors import OvisDataError
from ovis_data.pack.templates import FIXED_FORMATS, ChatFormat, ChatTemplateFormat, Turn, detect_chat_format
from ovis_data.pack.tokenize import SampleEncoder

FORMATS: dict[str, ChatFormat] = FIXED_FORMATS


def stop_token(fmt: ChatFormat) -> str:
    """The token that ends an assistant turn (the turn end without its trailing newline)."""
    return fmt.turn_end.rstrip("\n")


def detect_template(tokenizer: Any) -> str | None:
    """The chat format family from the tokenizer's special tokens, "chat_template" for a tokenizer with
    only its own chat template (as pack falls back to), or None when it has neither."""
    try:
        fmt = detect_chat_format(tokenizer, "auto")
    except OvisDataError:
        return None
    return fmt.name


def stop_ids(tokenizer: Any, template: str) -> list[int]:
    """Token ids that end an answer: the format's turn end, or the tokenizer's EOS for its own template."""
    if template in FORMATS:
        return [tokenizer.convert_tokens_to_ids(stop_token(FORMATS[template]))]
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def generation_prompt(
    tokenizer: Any,
    template: str,
    query: str,
    system: str | None = None,
    history: Sequence[tuple[str, str]] = (),
) -> tuple[str, list[int]]:
    """(prompt text, ids): the system turn (the format's default unless given), the earlier (user,
    assistant) exchanges of `history`, the user's query, then an open assistant header. Every turn is
    rendered and tokenized as pack does for a multi-turn training conversation."""
    roles: list[str] = ["system"] if system is not None else []
    texts: list[str | None] = [system] if system is not None else []
    for user, assistant in history:
        roles += ["human", "gpt"]
        texts += [user, assistant]
    roles.append("human")
    texts.append(query)
    if template == "chat_template":
        return _own_template_prompt(tokenizer, roles, texts)
    if template not in FORMATS:
        raise ValueError(f"unknown chat template {template!r}; known: {sorted(FORMATS)}, chat_template")
    fmt = FORMATS[template]
    turns = [*fmt.render(roles, texts), Turn(fmt.roles["gpt"])]
    # the tiktoken twin (same ids) costs ~0.9 s to build: not worth it for one prompt
    ids, _ = SampleEncoder(tokenizer, fmt, use_twin=False).encode_turns([turns]).sample(0)
    return "".join(t.text for t in turns), ids.tolist()


def _own_template_prompt(tokenizer: Any, roles: list[str], texts: list[str | None]) -> tuple[str, list[int]]:
    """The tokenizer's own chat template: the conversation's turns as pack tokenizes them, then the
    assistant header's tokens as they are in training, where an answer follows. White space that merges
    into the answer's first word there ("ASSISTANT: " + "Hi" -> " Hi") is left for the model to write,
    as it learned to."""
    fmt = ChatTemplateFormat(tokenizer)
    turns = fmt.render(roles, [t or "" for t in texts])
    done = "".join(t.text for t in turns)
    opened = fmt.generation_prompt(roles, [t or "" for t in texts])
    if not opened.startswith(done):
        raise ValueError("the chat template's generation prompt does not extend the conversation it renders")
    header = opened[len(done) :]
    encoder = SampleEncoder(tokenizer, fmt, use_twin=False)
    probe = header + "Answer"  # a typical first word
    n = encoder.context_header_length(header, probe)
    head = tokenizer(probe, add_special_tokens=False, return_offsets_mapping=True)
    ids, _ = encoder.encode_turns([turns]).sample(0)
    end = head["offset_mapping"][n - 1][1] if n else 0
    return done + header[:end], ids.tolist() + list(head["input_ids"][:n])
