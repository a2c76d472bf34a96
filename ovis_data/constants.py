"""Values and rules the data engine's stages and the model must agree on, defined once (docs/templates.md
explains them)."""

from __future__ import annotations

IGNORE_ID = -100  # label of an unsupervised position (PyTorch's cross-entropy ignore_index)
IMAGE_ID = -200  # token id of one image's placeholder in packed ids (the model expands it)
IMAGE_MARK = "<image>"  # where an image goes in a sample's text
DEFAULT_CAPTION_TEMPLATE = f"{IMAGE_MARK}'s caption: "  # a caption sample's prompt, as the original trained


def vit_resized_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) of an image resized for a ViT of `side` pixels: the longer side becomes `side`, the
    shorter `int(short / long * side)` (at least 1), as the original did; the model then pads it square.
    Pack stores images at this size and the image processor resizes to it, so both use this one rule."""
    if width >= height:
        return side, max(1, int(height / width * side))
    return max(1, int(width / height * side)), side


def clean_caption(caption: str | None) -> str:
    """The caption text that is trained on: a literal `<image>` removed, surrounding white space stripped.
    Validate rejects a caption this leaves empty (`empty_caption`) by calling this very function."""
    return (caption or "").replace(IMAGE_MARK, "").strip()
