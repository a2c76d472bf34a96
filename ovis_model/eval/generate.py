"""The one place ovis-eval asks the model: `answer_batch(model, [(images, query), ...], max_new_tokens)`
-> the answers, greedy. For now one `chat()` call per question (the batch only groups the calls); a
batched runner takes its place here, and nowhere else."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

Item = tuple[list[Image.Image], str]  # the question's images and its query (with its <image> markers)
AnswerFn = Callable[[Sequence[Item]], list[str]]


def answer_batch(model: Any, items: Sequence[Item], max_new_tokens: int) -> list[str]:
    from ..chat import chat

    return [chat(model, images, query, max_new_tokens=max_new_tokens).output for images, query in items]


def model_answerer(model: Any, max_new_tokens: int) -> AnswerFn:
    """`answer_batch` bound to a model, as score.evaluate_bench takes it."""
    return lambda items: answer_batch(model, items, max_new_tokens)
