"""The one place ovis-eval asks the model: `answer_batch(model, [(images, query), ...], max_new_tokens)`
-> the answers, greedy, generated as one batch by the runner (equal to one-by-one greedy answers)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

Item = tuple[list[Image.Image], str]  # the question's images and its query (with its <image> markers)
AnswerFn = Callable[[Sequence[Item]], list[str]]


def answer_batch(model: Any, items: Sequence[Item], max_new_tokens: int) -> list[str]:
    from ..runner import OvisRunner

    runner = OvisRunner(model)
    results = runner.run_batch(list(items), batch_size=max(1, len(items)), max_new_tokens=max_new_tokens)
    return [r.output for r in results]


def model_answerer(model: Any, max_new_tokens: int) -> AnswerFn:
    """`answer_batch` bound to a model, as score.evaluate_bench takes it."""
    return lambda items: answer_batch(model, items, max_new_tokens)
