"""The packed stage's manifest checked against the model before the first batch.

Pack writes what it assumed into manifest.json: the tokenizer (its vocabulary hash), the visual tokens per
image and the image size. A model that disagrees would train on shifted image positions or another
vocabulary without any error, so a mismatch stops the run and names both values and the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ovis_data.pack.tokenize import vocab_identity
from ovis_data.shardformat import FORMAT


class ContractError(ValueError):
    """The manifest does not fit the model."""


def check_manifest(manifest: dict, path: Path | str, model: Any) -> None:
    """Raise ContractError unless `manifest` (at `path`) fits `model` (an Ovis with its tokenizer)."""
    if manifest.get("format") != FORMAT:
        raise ContractError(f"{path}: format {manifest.get('format')!r}, this trainer reads {FORMAT!r}")
    checks = [
        ("visual tokens per image", "--visual-tokens", manifest.get("visual_tokens_per_image")),
        ("image size", "--image-size", manifest.get("image_size")),
    ]
    wanted_values = (model.num_visual_tokens, model.image_processor.image_size)
    for (what, flag, packed), wanted in zip(checks, wanted_values, strict=True):
        if packed != wanted:
            raise ContractError(
                f"{path}: packed with {what} {packed}, the model has {wanted}: re-pack with "
                f"`ovis-data pack {flag} {wanted}`"
            )
    tok = manifest.get("tokenizer", {})
    if model.text_tokenizer is None:
        raise ContractError(f"{path}: the model has no tokenizer to compare with the packed one")
    ours = vocab_identity(model.text_tokenizer)
    if tok.get("vocab_sha256") != ours:
        raise ContractError(
            f"{path}: packed with tokenizer {tok.get('name')!r} (vocab {str(tok.get('vocab_sha256'))[:12]}), "
            f"the model's tokenizer {getattr(model.text_tokenizer, 'name_or_path', '?')!r} has vocab "
            f"{ours[:12]}: pack with the model's tokenizer"
        )
