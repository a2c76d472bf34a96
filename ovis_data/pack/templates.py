"""Text templates of Ovis v1 (docs/templates.md): the caption template and the chat formats.

A template turns one sample into *turns*: strings that are each tokenized on their own (split only at
`<image>`), with the supervised span of a turn given as a prefix whose token count is where labels start.
Tokenization itself lives in `ovis_data.pack.tokenize`; this module only renders text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..constants import DEFAULT_CAPTION_TEMPLATE, IGNORE_ID, IMAGE_ID, IMAGE_MARK, clean_caption
from ..errors import OvisDataError

__all__ = ["DEFAULT_CAPTION_TEMPLATE", "IGNORE_ID", "IMAGE_ID", "IMAGE_MARK"]  # re-exported for callers
CHAT_FORMATS = ("qwen", "llama3", "gemma", "chat_template")
_CHAT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


class Turn(NamedTuple):
    """One separately tokenized piece of a sample.

    `header` is None for an unsupervised turn; otherwise labels start at len(tok(header)) inside the
    turn's tokens and run to its end, less the final token when `drop_last` (the newline after the end
    marker, whose loss the later Ovis release called meaningless).
    """

    text: str
    header: str | None = None
    drop_last: bool = False


class TemplateError(ValueError):
    """A sample the template cannot render (Gemma given a system turn, an unknown role): the sample is
    dropped and counted, never a crash."""


@dataclass(frozen=True)
class ChatFormat:
    """A fixed chat format: role prefixes, turn end, BOS, default system prompt and label rule."""

    name: str
    roles: dict[str, str]  # 'system' | 'human' | 'gpt' -> role prefix
    turn_end: str
    bos: str  # rendered first, never supervised; "" for none
    default_system: str | None  # inserted when the first turn is not a system turn; None: never
    strip_values: bool
    drop_last: bool
    special_tokens: tuple[str, ...]  # must be single special tokens of the tokenizer

    def render(self, roles: Sequence[str], texts: Sequence[str]) -> list[Turn]:
        if len(roles) != len(texts):
            raise TemplateError(f"{len(roles)} roles but {len(texts)} texts")
        turns = [Turn(self.bos)] if self.bos else []
        if self.default_system is not None and (not roles or roles[0] != "system"):
            turns.append(Turn(self.roles["system"] + self.default_system + self.turn_end))
        gpt_role = self.roles["gpt"]
        for frm, value in zip(roles, texts, strict=True):
            role = self.roles.get(frm)
            if role is None:
                raise TemplateError(f"{self.name} has no {frm!r} turn")
            value = value or ""
            if self.strip_values:
                value = value.strip()
            text = role + value + self.turn_end
            turns.append(Turn(text, gpt_role, self.drop_last) if frm == "gpt" else Turn(text))
        return turns

    def generation_prompt(self, roles: Sequence[str], texts: Sequence[str]) -> str:
        """Inference prompt: the conversation (with its system turn) followed by an open assistant role."""
        return "".join(t.text for t in self.render(roles, texts)) + self.roles["gpt"]


QWEN = ChatFormat(
    name="qwen",
    roles={"system": "<|im_start|>system\n", "human": "<|im_start|>user\n", "gpt": "<|im_start|>assistant\n"},
    turn_end="<|im_end|>\n",
    bos="",
    default_system="You are a helpful assistant.",
    strip_values=False,
    drop_last=True,
    special_tokens=("<|im_start|>", "<|im_end|>"),
)
LLAMA3 = ChatFormat(
    name="llama3",
    roles={
        "system": "<|start_header_id|>system<|end_header_id|>\n\n",
        "human": "<|start_header_id|>user<|end_header_id|>\n\n",
        "gpt": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    },
    turn_end="<|eot_id|>",
    bos="<|begin_of_text|>",
    default_system="You are a helpful and honest multimodal assistant.",
    strip_values=True,
    drop_last=False,
    special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)
GEMMA = ChatFormat(
    name="gemma",
    roles={"human": "<start_of_turn>user\n", "gpt": "<start_of_turn>model\n"},  # no system role
    turn_end="<end_of_turn>\n",
    bos="<bos>",
    default_system=None,
    strip_values=False,
    drop_last=True,
    special_tokens=("<bos>", "<start_of_turn>", "<end_of_turn>"),
)
FIXED_FORMATS = {f.name: f for f in (QWEN, LLAMA3, GEMMA)}


class ChatTemplateFormat:
    """Any other LLM family, through the tokenizer's own chat template: each turn is the difference
    between renderings of successive prefixes of the conversation, and an assistant turn's header is
    what `add_generation_prompt` appends. Refuses (TemplateError) whenever renderings are not prefixes
    of one another, since labels could then not be placed reliably."""

    name = "chat_template"

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise OvisDataError(
                f"tokenizer {tokenizer_name(tokenizer)!r} has no chat template and none of the known chat "
                f"formats ({', '.join(FIXED_FORMATS)}): name a template in the recipe or use another "
                "tokenizer"
            )
        self.tokenizer = tokenizer

    def _render(self, messages: list[dict[str, str]], generation: bool) -> str:
        if not messages:
            raise TemplateError("chat template cannot place an assistant turn that opens the conversation")
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation
            )
        except Exception as e:  # the template's own raise_exception (e.g. roles must alternate)
            raise TemplateError(f"chat template refused the conversation: {e}") from e

    def render(self, roles: Sequence[str], texts: Sequence[str]) -> list[Turn]:
        messages = []
        for frm, value in zip(roles, texts, strict=True):
            if frm not in _CHAT_ROLES:
                raise TemplateError(f"chat template has no {frm!r} turn")
            messages.append({"role": _CHAT_ROLES[frm], "content": value or ""})
        turns: list[Turn] = []
        done = ""
        for k in range(1, len(messages) + 1):
            full = self._render(messages[:k], False)
            if not full.startswith(done):
                raise TemplateError("chat template renderings are not prefixes of one another")
            if messages[k - 1]["role"] == "assistant":
                opened = self._render(messages[: k - 1], True)
                if not (opened.startswith(done) and full.startswith(opened)):
                    raise TemplateError("chat template's assistant header is not a prefix of its turn")
                text = full[len(done) :]
                turns.append(Turn(text, opened[len(done) :], text != text.rstrip()))
            else:
                turns.append(Turn(full[len(done) :]))
            done = full
        return turns

    def generation_prompt(self, roles: Sequence[str], texts: Sequence[str]) -> str:
        messages = [{"role": _CHAT_ROLES[f], "content": v or ""} for f, v in zip(roles, texts, strict=True)]
        return self._render(messages, True)


def render_caption(caption: str | None, template: str = DEFAULT_CAPTION_TEMPLATE) -> list[Turn]:
    """`tok(head) + [-200] + tok(tail) + tok(caption)`: the template is one turn (split at its `<image>`),
    the caption another, fully supervised. A literal `<image>` in a caption is text: removed, then
    stripped of surrounding white space (as the later release did)."""
    if template.count(IMAGE_MARK) != 1:
        raise OvisDataError(f"caption template {template!r} must contain exactly one {IMAGE_MARK!r}")
    return [Turn(template), Turn(clean_caption(caption), "", False)]


def tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _has_special(tokenizer: Any, token: str) -> bool:
    ids = tokenizer.encode(token, add_special_tokens=False)
    return len(ids) == 1 and ids[0] != getattr(tokenizer, "unk_token_id", None)


def detect_chat_format(tokenizer: Any, name: str = "auto") -> ChatFormat | ChatTemplateFormat:
    """The chat format named in the recipe, or ('auto') the one whose special tokens the tokenizer has,
    else its own chat template. A named format the tokenizer cannot express is an error naming both."""
    if name in FIXED_FORMATS:
        fmt = FIXED_FORMATS[name]
        missing = [t for t in fmt.special_tokens if not _has_special(tokenizer, t)]
        if missing:
            raise OvisDataError(
                f"template {name!r} needs special tokens {missing} that tokenizer "
                f"{tokenizer_name(tokenizer)!r} lacks"
            )
        return fmt
    if name == "chat_template":
        return ChatTemplateFormat(tokenizer)
    if name != "auto":
        raise OvisDataError(f"unknown template {name!r}; known: auto, {', '.join(CHAT_FORMATS)}")
    for fmt in FIXED_FORMATS.values():
        if all(_has_special(tokenizer, t) for t in fmt.special_tokens):
            return fmt
    return ChatTemplateFormat(tokenizer)
