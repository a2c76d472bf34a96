"""The Ovis vision-language model (visual tokenizer + visual embedding table + LLM), packed-sequence ready."""

from .batching import batch_to, collate_packed, expand_image_placeholders
from .configuration import OvisConfig, VisualTokenizerConfig
from .constants import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_ID
from .embedding import VisualEmbedding
from .modeling import Ovis, OvisOutput
from .preprocess import OvisImageProcessor
from .trainable import TRAINABLE_NAMES, select_trainable
from .visual_tokenizer import VisualTokenizer

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_ID",
    "TRAINABLE_NAMES",
    "Ovis",
    "OvisConfig",
    "OvisImageProcessor",
    "OvisOutput",
    "VisualEmbedding",
    "VisualTokenizer",
    "VisualTokenizerConfig",
    "batch_to",
    "collate_packed",
    "expand_image_placeholders",
    "select_trainable",
]
