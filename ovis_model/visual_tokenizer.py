"""Visual tokenizer: a Hugging Face vision backbone + a head giving each patch a visual-word distribution."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init

from .configuration import VisualTokenizerConfig

log = logging.getLogger(__name__)


def _st_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Straight-through argmax: one-hot forward, softmax gradient."""
    soft = logits.softmax(-1)
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    return hard - soft.detach() + soft


def backbone_has_cls(backbone: nn.Module) -> bool:
    """CLIP-style embeddings carry a class token (dropped); SigLIP's do not."""
    embeddings = getattr(getattr(backbone, "vision_model", backbone), "embeddings", None)
    return hasattr(embeddings, "class_embedding")


class VisualTokenizer(PreTrainedModel):
    config_class = VisualTokenizerConfig
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: VisualTokenizerConfig, backbone: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        # The backbone's own attention choice is kept; sdpa is the default for CLIP/SigLIP in transformers.
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config.backbone_config)
        if config.drop_cls_token and not backbone_has_cls(self.backbone):
            log.info(
                "backbone %s has no CLS token: drop_cls_token set to False", config.backbone_config.model_type
            )
            config.drop_cls_token = False
        width = self.backbone.config.hidden_size * config.hidden_stride**2
        self.head = nn.Sequential(
            nn.Linear(width, config.head_size, bias=False), nn.LayerNorm(config.head_size)
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is self.head[0]:  # torch's Linear default, as the original head had: U(+-1/sqrt(fan_in))
            bound = module.in_features**-0.5
            init.uniform_(module.weight, -bound, bound)
        elif module is self.head[1]:
            init.ones_(module.weight)
            init.zeros_(module.bias)

    # -- layers -------------------------------------------------------------------------------------------
    def backbone_layers(self) -> nn.ModuleList:
        vision = getattr(self.backbone, "vision_model", self.backbone)
        return vision.encoder.layers

    def unused_modules(self) -> dict[str, nn.Module]:
        """Backbone parts outside Ovis' graph: the post layer norm and any pooling head (features are taken
        before them), so they never get a gradient and are kept frozen."""
        vision = getattr(self.backbone, "vision_model", self.backbone)
        names = {id(m): n for n, m in self.backbone.named_modules()}
        out = {}
        for attr in ("post_layernorm", "head"):
            module = getattr(vision, attr, None)
            if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
                out[f"backbone.{names[id(module)]}"] = module
        return out

    def re_init_layer_dict(self, n_last: int) -> dict[str, nn.Module]:
        """The backbone's last `n_last` blocks by parameter-name prefix (stage 1 re-initialises them)."""
        layers = self.backbone_layers()
        if not 0 <= n_last <= len(layers):
            raise ValueError(f"re_init_layers must be in [0, {len(layers)}], got {n_last}")
        names = {id(m): n for n, m in self.backbone.named_modules()}  # layout differs across transformers
        return {
            f"backbone.{names[id(layers[i])]}": layers[i] for i in range(len(layers) - n_last, len(layers))
        }

    @property
    def num_visual_tokens(self) -> int:
        return self.config.num_visual_tokens

    # -- forward ------------------------------------------------------------------------------------------
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[n, patches / stride^2, width * stride^2]` features of the last block (no post layer norm)."""
        dtype = next(self.backbone.parameters()).dtype
        out = self.backbone(pixel_values.to(dtype), output_hidden_states=True, return_dict=True)
        # hidden_states[-1] is the last block's output: SigLIP applies post_layernorm to last_hidden_state,
        # CLIP does not; the original used the un-normed features for both.
        features = out.hidden_states[-1]
        if self.config.drop_cls_token:
            features = features[:, 1:, :]
        stride = self.config.hidden_stride
        if stride > 1:  # merge stride x stride neighbouring patches into one token (later releases)
            n, length, d = features.shape
            side = int(length**0.5)
            if side * side != length or side % stride:
                raise ValueError(f"{length} patches do not form a square divisible by hidden_stride={stride}")
            features = features.reshape(n, side // stride, stride, side // stride, stride, d)
            features = features.permute(0, 1, 3, 2, 4, 5).reshape(n, length // stride**2, stride * stride * d)
        return features

    def tokenize(self, logits: torch.Tensor) -> torch.Tensor:
        fn = self.config.tokenize_function
        if fn == "softmax":
            return logits.softmax(-1)
        if fn == "gumbel_argmax":
            return F.gumbel_softmax(logits, tau=self.config.tau, hard=True)
        return _st_argmax(logits)  # config validation leaves only st_argmax

    def patch_probabilities(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[n, patches, head_size]`: each patch's distribution over the non-indicator visual words."""
        return self.tokenize(self.head(self.encode(pixel_values)))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[n, num_visual_tokens, V]` as the original: patch distributions framed by one-hot indicators."""
        probs = self.patch_probabilities(pixel_values)
        if not self.config.use_indicators:
            return probs
        n, length, _ = probs.shape
        v = self.config.vocab_size
        probs = F.pad(probs, (0, 2))  # the two indicator words get probability 0 at patches
        begin = F.one_hot(torch.full((n, 1), v - 2, device=probs.device), v).to(probs.dtype)
        end = F.one_hot(torch.full((n, 1), v - 1, device=probs.device), v).to(probs.dtype)
        return torch.cat([begin, probs, end], dim=1)
