"""The values the model shares with the data engine, under the names model code uses (defined once, in
ovis_data.constants), and the model's own defaults that several modules use."""

from ovis_data.constants import IGNORE_ID as IGNORE_INDEX
from ovis_data.constants import IMAGE_ID as IMAGE_TOKEN_ID
from ovis_data.constants import IMAGE_MARK as IMAGE_TOKEN

# Visual words of the visual tokenizer, its two indicator words included: the original's V (docs/training.md)
VISUAL_VOCAB_SIZE = 131072

__all__ = ["IGNORE_INDEX", "IMAGE_TOKEN", "IMAGE_TOKEN_ID", "VISUAL_VOCAB_SIZE"]
