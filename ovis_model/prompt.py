"""Generation prompts for `chat`, in the chat formats of OVIS_V1.md section 3 (Qwen, Llama 3, Gemma).

Each turn is tokenized as one string, split only at `<image>`, with `add_special_tokens=False`; the pieces
are joined with one `-200` per image, as the pack stage does for training.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import IMAGE_TOKEN, IMAGE_TOKEN_ID


@dataclass(frozen=True)
class ChatFormat:
    prefix: str  # once, before the first turn
    system: str  # role header of each kind of turn
    user: str
    assistant: str | None
    turn_end: str  # after each turn's value
    default_system: str | None
    strip_value: bool
    stop: str  # the token that ends an assistant turn


FORMATS: dict[str, ChatFormat] = {
    "qwen": ChatFormat(
        prefix="",
        system="<|im_start|>system\n",
        user="<|im_start|>user\n",
        assistant="<|im_start|>assistant\n",
        turn_end="<|im_end|>\n",
        default_system="You are a helpful assistant.",
        strip_value=False,
        stop="<|im_end|>",
    ),
    "llama3": ChatFormat(
        prefix="<|begin_of_text|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n",
        user="<|start_header_id|>user<|end_header_id|>\n\n",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
        turn_end="<|eot_id|>",
        default_system="You are a helpful and honest multimodal assistant.",
        strip_value=True,
        stop="<|eot_id|>",
    ),
    "gemma": ChatFormat(
        prefix="<bos>",
        system="",
        user="<start_of_turn>user\n",
        assistant="<start_of_turn>model\n",
        turn_end="<end_of_turn>\n",
        default_system=None,  # Gemma has no system role
        strip_value=False,
        stop="<end_of_turn>",
    ),
}


def detect_template(tokenizer) -> str | None:  # noqa: ANN001 (any HF tokenizer)
    """The chat format family from the tokenizer's special tokens, or None when unknown."""
    vocab = tokenizer.get_vocab()
    for name, marker in (
        ("qwen", "<|im_start|>"),
        ("llama3", "<|start_header_id|>"),
        ("gemma", "<start_of_turn>"),
    ):
        if marker in vocab:
            return name
    return None


def tokenize_with_images(tokenizer, text: str) -> list[int]:  # noqa: ANN001
    """Token ids of `text` with one `-200` per `<image>`, the pieces tokenized separately."""
    ids: list[int] = []
    for i, piece in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            ids.append(IMAGE_TOKEN_ID)
        if piece:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids


def generation_prompt(
    tokenizer,  # noqa: ANN001
    template: str,
    query: str,
    system: str | None = None,
) -> tuple[str, list[int]]:
    """(prompt text, ids): system turn, the user's query, then an open assistant header."""
    if template not in FORMATS:
        raise ValueError(f"unknown chat template {template!r}; known: {sorted(FORMATS)}")
    fmt = FORMATS[template]
    system = system if system is not None else fmt.default_system

    def value(v: str) -> str:
        return v.strip() if fmt.strip_value else v

    turns = []
    if system is not None:
        if not fmt.system:
            raise ValueError(f"the {template} format has no system role")
        turns.append(fmt.system + value(system) + fmt.turn_end)
    turns.append(fmt.user + value(query) + fmt.turn_end)
    turns.append(fmt.assistant)
    ids = tokenizer(fmt.prefix, add_special_tokens=False)["input_ids"] if fmt.prefix else []
    for turn in turns:
        ids.extend(tokenize_with_images(tokenizer, turn))
    return fmt.prefix + "".join(turns), ids
