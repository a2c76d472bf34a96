"""Configs of the visual tokenizer and of Ovis, registered with transformers' Auto classes.

Written in the classic `__init__` style (not 5.x dataclass fields) so that the same code loads under every
transformers 4.45+ / 5.x release the project meets.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

from .constants import VISUAL_VOCAB_SIZE

TOKENIZE_FUNCTIONS = ("softmax", "gumbel_argmax", "st_argmax")


def _as_config(value: PretrainedConfig | dict | None) -> PretrainedConfig | None:
    """A nested config arrives as a config object (in code) or as a dict (from config.json)."""
    if value is None or isinstance(value, PretrainedConfig):
        return value
    if not isinstance(value, dict) or "model_type" not in value:
        raise TypeError(
            f"expected a PretrainedConfig or a dict with 'model_type', got {type(value).__name__}"
        )
    kwargs = dict(value)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


class VisualTokenizerConfig(PretrainedConfig):
    """Backbone config + head: each patch gets a distribution over `vocab_size` visual words.

    The last two words (V-2, V-1) are the image begin/end indicators when `use_indicators`; the head then
    predicts over the first V-2 words only.
    """

    model_type = "ovis_visual_tokenizer"

    def __init__(
        self,
        backbone_config: PretrainedConfig | dict | None = None,
        vocab_size: int = VISUAL_VOCAB_SIZE,
        tokenize_function: str = "softmax",
        tau: float = 1.0,
        use_indicators: bool = True,
        drop_cls_token: bool = True,
        hidden_stride: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if tokenize_function not in TOKENIZE_FUNCTIONS:
            raise ValueError(
                f"tokenize_function must be one of {TOKENIZE_FUNCTIONS}, got {tokenize_function!r}"
            )
        if hidden_stride < 1:
            raise ValueError(f"hidden_stride must be >= 1, got {hidden_stride}")
        self.backbone_config = _as_config(backbone_config)
        self.vocab_size = vocab_size
        self.tokenize_function = tokenize_function
        self.tau = tau
        self.use_indicators = use_indicators
        self.drop_cls_token = drop_cls_token
        self.hidden_stride = hidden_stride

    @property
    def head_size(self) -> int:
        """Width of the head's output: the vocabulary less the two reserved indicator words."""
        return self.vocab_size - 2 if self.use_indicators else self.vocab_size

    @property
    def image_size(self) -> int:
        return int(self.backbone_config.image_size)

    @property
    def num_patches(self) -> int:
        side = self.backbone_config.image_size // self.backbone_config.patch_size
        return side * side

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens one image becomes in the LLM sequence (578 for CLIP-L/14-336 with indicators)."""
        return self.num_patches // (self.hidden_stride**2) + (2 if self.use_indicators else 0)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if isinstance(self.backbone_config, PretrainedConfig):
            out["backbone_config"] = self.backbone_config.to_dict()
        return out


class OvisConfig(PretrainedConfig):
    """The LLM's config, the visual tokenizer's config and the chat template family used by `chat`."""

    model_type = "ovis"

    def __init__(
        self,
        llm_config: PretrainedConfig | dict | None = None,
        visual_tokenizer_config: VisualTokenizerConfig | dict | None = None,
        conversation_template: str | None = None,
        vte_init_std: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.llm_config = _as_config(llm_config)
        if isinstance(visual_tokenizer_config, dict):
            vt = dict(visual_tokenizer_config)
            vt.pop("model_type", None)
            visual_tokenizer_config = VisualTokenizerConfig(**vt)
        self.visual_tokenizer_config = visual_tokenizer_config
        self.conversation_template = conversation_template  # "qwen", "llama3", "gemma" or None
        self.vte_init_std = vte_init_std  # the original initialised the VTE with N(0, 1)
        self.hidden_size = self.llm_config.hidden_size if self.llm_config is not None else None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in ("llm_config", "visual_tokenizer_config"):
            value = getattr(self, key)
            if isinstance(value, PretrainedConfig):
                out[key] = value.to_dict()
        return out


AutoConfig.register(VisualTokenizerConfig.model_type, VisualTokenizerConfig)
AutoConfig.register(OvisConfig.model_type, OvisConfig)
