"""The Ovis vision-language model (visual tokenizer + visual embedding table + LLM), packed-sequence ready.

Names are imported on first use, so that `ovis-train`'s checks of its inputs and `--help` answer
before torch and transformers are loaded.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IGNORE_INDEX": "constants",
    "IMAGE_TOKEN": "constants",
    "IMAGE_TOKEN_ID": "constants",
    "TRAINABLE_NAMES": "trainable",
    "Ovis": "modeling",
    "OvisConfig": "configuration",
    "OvisImageProcessor": "preprocess",
    "OvisOutput": "modeling",
    "OvisRunner": "runner",
    "VisualEmbedding": "embedding",
    "VisualTokenizer": "visual_tokenizer",
    "VisualTokenizerConfig": "configuration",
    "batch_to": "batching",
    "collate_packed": "batching",
    "expand_image_placeholders": "batching",
    "select_trainable": "trainable",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
