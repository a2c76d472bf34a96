"""Ovis: visual tokenizer + visual embedding table merged into an LLM's input embeddings (docs/stages.md).

Batch input is the packed format of `ovis_model.batching`: each image's `-200` placeholder already repeated
`num_visual_tokens` times, several sub-samples per row described by `segment_ids` / `position_ids`, and
attention kept inside each sub-sample (see `ovis_model.attention`). The loss is returned as a sum and a
supervised-token count so that the trainer can normalise by the global count.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from ovis_data.shardformat import placeholder_mismatch

from .attention import default_attn_implementation, llm_attention_kwargs, positions_from_lengths
from .chat import chat
from .chunked import CHUNK_ELEMENTS, lm_loss_sum, soft_visual_embeddings
from .configuration import VISUAL_VOCAB_SIZE, OvisConfig, VisualTokenizerConfig
from .constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from .embedding import VisualEmbedding
from .preprocess import CONFIG_NAME as IMAGE_PROCESSOR_CONFIG
from .preprocess import OvisImageProcessor
from .prompt import detect_template
from .segment_attention import register as register_segment_attention
from .visual_tokenizer import VisualTokenizer, backbone_has_cls

log = logging.getLogger(__name__)
register_segment_attention()  # `sdpa_segments` is a valid attn_implementation wherever Ovis is


@dataclass
class OvisOutput(ModelOutput):
    """`loss` = `loss_sum / (loss_normalizer or n_tokens)`; `n_tokens` counts supervised (shifted) targets."""

    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    n_tokens: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def shift_targets(labels: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """Target of position t is label t+1 of the same sub-sample; -100 across a boundary and at the end."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    if segment_ids is not None:
        boundary = F.pad(segment_ids[:, 1:] != segment_ids[:, :-1], (0, 1), value=True)
        targets = targets.masked_fill(boundary, IGNORE_INDEX)
    return targets


def load_vision_backbone(path: str | os.PathLike, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The vision tower in a local HF directory: a vision model, or the vision half of CLIP/SigLIP."""
    config = AutoConfig.from_pretrained(path)
    kwargs: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
    vision_config = getattr(config, "vision_config", None)
    if vision_config is None:
        return AutoModel.from_pretrained(path, **kwargs)
    # A dual encoder checkpoint: its vision_model.* weights load into the vision class; text ones go unused.
    vision_cls = AutoModel._model_mapping[type(vision_config)]
    return vision_cls.from_pretrained(path, config=vision_config, **kwargs)


class Ovis(PreTrainedModel):
    config_class = OvisConfig
    base_model_prefix = "ovis"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(
        self,
        config: OvisConfig,
        llm: PreTrainedModel | None = None,
        visual_tokenizer: VisualTokenizer | None = None,
    ) -> None:
        super().__init__(config)
        self.llm = llm if llm is not None else AutoModelForCausalLM.from_config(config.llm_config)
        vt_config = config.visual_tokenizer_config
        self.visual_tokenizer = (
            visual_tokenizer if visual_tokenizer is not None else VisualTokenizer(vt_config)
        )
        self.vte = VisualEmbedding(vt_config.vocab_size, config.llm_config.hidden_size)
        # Not modules: attached by from_parts / from_pretrained, saved beside the weights.
        self.text_tokenizer = None
        self.image_processor = OvisImageProcessor.for_backbone(vt_config.backbone_config)
        # None: a micro-batch without images runs the ViT on a stand-in only where training needs it (see
        # _stand_in_needed); True forces the stand-in, False never runs it.
        self.sync_visual_forward: bool | None = None
        # elements per chunk of the LM loss and of the visual head (ovis_model.chunked); None computes each
        # in one piece (the reference the chunked paths are tested against)
        self.loss_chunk_elements: int | None = CHUNK_ELEMENTS
        self.visual_chunk_elements: int | None = CHUNK_ELEMENTS
        # on a CPU the LM loss and a softmax visual head run in cache-sized tiles (ovis_model.tiled_loss,
        # ovis_model.visual_head); False: the chunks above
        self.tiles = True
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, VisualEmbedding):  # the original drew the VTE from N(0, 1)
            init.normal_(module.weight, mean=0.0, std=self.config.vte_init_std)

    # -- parts --------------------------------------------------------------------------------------------
    @property
    def num_visual_tokens(self) -> int:
        return self.visual_tokenizer.num_visual_tokens

    @property
    def attn_implementation(self) -> str | None:
        return self.llm.config._attn_implementation

    def set_llm_attention(self, attn_implementation: str) -> None:
        """LLM attention (ovis_model.attention): sdpa_segments (per segment), flex_attention (block mask),
        flash_attention_2 (varlen), or the dense-mask sdpa / eager."""
        if hasattr(self.llm, "set_attn_implementation"):
            self.llm.set_attn_implementation(attn_implementation)
        else:  # older transformers
            self.llm.config._attn_implementation = attn_implementation
        self.config.llm_config._attn_implementation = attn_implementation

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        for part in (self.llm, self.visual_tokenizer.backbone):
            # transformers 5.x renamed it; the old name warns on every run (a FutureWarning until v6)
            if hasattr(part, "activation_checkpointing_enable"):
                part.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                part.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # -- embeddings ---------------------------------------------------------------------------------------
    def visual_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[n, num_visual_tokens, hidden]`: soft VTE lookup of the patches, framed by the indicator rows.

        Equal to `vte(visual_tokenizer(pixel_values))` without building the `[n, tokens, V]` one-hot frame,
        the head and soft lookup a chunk of patches at a time (`visual_chunk_elements`).
        """
        features = self.visual_tokenizer.encode(pixel_values)
        embeds = soft_visual_embeddings(
            self.visual_tokenizer, self.vte, features, self.visual_chunk_elements, self.tiles
        )
        if self.config.visual_tokenizer_config.use_indicators:
            v = self.config.visual_tokenizer_config.vocab_size
            indicators = self.vte(torch.tensor([v - 2, v - 1], device=embeds.device))
            n = embeds.shape[0]
            begin = indicators[0].expand(n, 1, -1).to(embeds.dtype)
            end = indicators[1].expand(n, 1, -1).to(embeds.dtype)
            embeds = torch.cat([begin, embeds, end], dim=1)
        return embeds

    def _stand_in_needed(self, n_local: int, device: torch.device) -> bool:
        """Whether a micro-batch without images must still run the ViT (on one zero image, weighted by 0).

        Only in training, in three cases:
        - another rank has images: under ZeRO-3 every rank must gather the same parameters in the same order
          and, under ZeRO-2, reduce the same gradient buckets; a rank skipping the ViT would hang both;
        - `sync_visual_forward` is True: set by whoever wraps the model when its engine needs every trainable
          parameter to get a gradient in every step (the trainer does so for visual parts under ZeRO-3:
          `ovis_model.trainable.visual_sync_mode`); True also forces it outside training;
        - only visual parts train: else the loss has no gradient at all.
        Otherwise (e.g. stage 3 under ZeRO-2, or one process) a batch without images runs no ViT. One MAX
        all-reduce per step tells whether any rank has images. `sync_visual_forward=False` disables the
        stand-in.
        """
        mode = self.sync_visual_forward
        if mode is False or (mode is None and not (self.training and torch.is_grad_enabled())):
            return False
        any_images = n_local > 0
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([n_local], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank calls it, with or without images
            any_images = int(flag.item()) > 0
        if n_local > 0:
            return False
        if any_images or mode is True:
            return True
        return not any(p.requires_grad for p in self.llm.parameters())

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Text embeddings with every run of image placeholders replaced by that image's visual embeddings."""
        image_mask = input_ids == IMAGE_TOKEN_ID
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        n_images = 0 if pixel_values is None else int(pixel_values.shape[0])
        if self._stand_in_needed(n_images, embeds.device):
            side = self.config.visual_tokenizer_config.image_size
            stand_in = torch.zeros(1, 3, side, side, device=embeds.device, dtype=embeds.dtype)
            # zero-weighted: keeps the visual parameters in the graph with zero gradients
            return embeds + self.visual_embeddings(stand_in).sum().to(embeds.dtype) * 0.0
        if n_images == 0:
            if bool(image_mask.any()):
                raise ValueError("input_ids hold image placeholders but no pixel_values were given")
            return embeds
        visual = self.visual_embeddings(pixel_values)
        mismatch = placeholder_mismatch(input_ids, visual.shape[0], visual.shape[1])
        if mismatch is not None:
            raise ValueError(
                f"input_ids hold {mismatch}: expand them with "
                "ovis_model.batching.expand_image_placeholders (or collate_packed)"
            )
        # masked_scatter fills the placeholders in row-major order, i.e. images in placeholder order
        return embeds.masked_scatter(image_mask.unsqueeze(-1), visual.to(embeds.dtype))

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.llm.get_output_embeddings()(hidden)
        cap = getattr(self.llm.config, "final_logit_softcapping", None)  # Gemma 2
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # -- forward ------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        attention_mask: torch.Tensor | None = None,
        loss_normalizer: torch.Tensor | float | None = None,
        return_logits: bool = False,
        n_supervised: int | None = None,
    ) -> OvisOutput:
        """Loss (and optionally logits) of a batch.

        input_ids: `[B, L]` expanded ids (`num_visual_tokens` placeholders per image); pixel_values:
        `[n_images, 3, S, S]` in placeholder order. segment_ids / position_ids: `[B, L]` packing layout (None:
        one sequence per row). attention_mask: an explicit mask for the LLM, overriding the packed one.
        loss_normalizer: divide `loss_sum` by this (e.g. the global supervised-token count) instead of the
        local count. Only supervised positions go through the LM head unless `return_logits`.
        n_supervised: `collate_packed`'s count, accepted so `model(**batch)` works, not used here. Any other
        keyword is an error (a misspelt `loss_normaliser` must not fall back to the local mean).
        """
        inputs_embeds = self.embed_inputs(input_ids, pixel_values)
        if segment_ids is not None and position_ids is None:
            position_ids = torch.stack(
                [
                    positions_from_lengths(torch.unique_consecutive(row, return_counts=True)[1])
                    for row in segment_ids
                ]
            ).to(input_ids.device)
        if attention_mask is not None:
            attn_kwargs: dict[str, Any] = {"attention_mask": attention_mask}
        else:
            attn_kwargs = llm_attention_kwargs(
                self.attn_implementation, segment_ids, inputs_embeds.dtype, cu_seqlens, max_seqlen
            )
        hidden = self.llm.get_decoder()(
            inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=False, **attn_kwargs
        ).last_hidden_state

        logits = self.lm_logits(hidden) if return_logits else None
        if labels is None:
            return OvisOutput(logits=logits)
        targets = shift_targets(labels.to(hidden.device), segment_ids)
        supervised = targets != IGNORE_INDEX
        if logits is not None:
            loss_sum = F.cross_entropy(logits[supervised].float(), targets[supervised], reduction="sum")
        else:  # never the whole [positions, vocab] logits at once (ovis_model.chunked)
            loss_sum = lm_loss_sum(
                self.llm.get_output_embeddings(),
                hidden[supervised],
                targets[supervised],
                getattr(self.llm.config, "final_logit_softcapping", None),
                self.loss_chunk_elements,
                self.tiles,
            )
        n_tokens = supervised.sum()
        normalizer = loss_normalizer if loss_normalizer is not None else n_tokens.clamp(min=1)
        return OvisOutput(loss=loss_sum / normalizer, loss_sum=loss_sum, n_tokens=n_tokens, logits=logits)

    # -- building -----------------------------------------------------------------------------------------
    @classmethod
    def from_parts(
        cls,
        llm: str | os.PathLike,
        vit: str | os.PathLike,
        visual_vocab_size: int = VISUAL_VOCAB_SIZE,
        tokenize_function: str = "softmax",
        tau: float = 1.0,
        use_indicators: bool = True,
        drop_cls_token: bool = True,
        hidden_stride: int = 1,
        re_init_layers: int = 0,
        conversation_template: str | None = None,
        vte_init_std: float = 1.0,
        dtype: torch.dtype | None = None,
        attn_implementation: str = "auto",
        pad_token_id: int | None = None,
    ) -> Ovis:
        """Stage 1: a base LLM and a base ViT (local HF directories) + a fresh head and VTE.

        re_init_layers: re-initialise the ViT's last N blocks (stage 1 of v1 re-initialised the last one).
        attn_implementation: the LLM's attention; "auto" = flash_attention_2 (varlen) where flash-attn and a
        GPU are present, flex_attention on other GPUs, sdpa_segments (per-segment SDPA) on CPU.
        """
        if attn_implementation == "auto":
            attn_implementation = default_attn_implementation()
        llm_kwargs: dict[str, Any] = {"attn_implementation": attn_implementation}
        if dtype is not None:
            llm_kwargs["dtype"] = dtype
        llm_model = AutoModelForCausalLM.from_pretrained(llm, **llm_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(llm)
        if tokenizer.pad_token_id is None and pad_token_id is not None:  # Llama 3 has none (v1 used 128001)
            tokenizer.pad_token_id = pad_token_id
        backbone = load_vision_backbone(vit, dtype)
        vt_config = VisualTokenizerConfig(
            backbone_config=backbone.config,
            vocab_size=visual_vocab_size,
            tokenize_function=tokenize_function,
            tau=tau,
            use_indicators=use_indicators,
            drop_cls_token=drop_cls_token and backbone_has_cls(backbone),
            hidden_stride=hidden_stride,
        )
        config = OvisConfig(
            llm_config=llm_model.config,
            visual_tokenizer_config=vt_config,
            conversation_template=conversation_template or detect_template(tokenizer),
            vte_init_std=vte_init_std,
        )
        model = cls(config, llm=llm_model, visual_tokenizer=VisualTokenizer(vt_config, backbone=backbone))
        with torch.no_grad():
            model.vte.weight.normal_(0.0, vte_init_std)
        model.config.re_init_layers = 0
        if re_init_layers:
            model.re_init_vit_layers(re_init_layers)
        if dtype is not None:
            model.to(dtype)
        model.text_tokenizer = tokenizer
        model.image_processor = OvisImageProcessor.for_backbone(backbone.config, vit)
        model.generation_config = llm_model.generation_config
        return model

    def re_init_vit_layers(self, n_last: int) -> list[str]:
        """Re-draw the ViT's last `n_last` blocks with the backbone's own initialiser (before DeepSpeed).

        transformers marks loaded tensors `_is_hf_initialized`, which makes its init functions no-ops; the
        flags are cleared first, else the re-initialisation would silently do nothing.
        """
        backbone = self.visual_tokenizer.backbone
        layers = self.visual_tokenizer.re_init_layer_dict(n_last)
        for name, layer in layers.items():
            for tensor in [*layer.parameters(), *layer.buffers()]:
                tensor._is_hf_initialized = False
            for module in layer.modules():
                module._is_hf_initialized = False
            with torch.no_grad():
                layer.apply(backbone._init_weights)
            log.info("re-initialised visual_tokenizer.%s", name)
        self.config.re_init_layers = n_last
        return list(layers)

    # -- persistence --------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Weights (safetensors) + config.json, and the tokenizer, image processor and generation config."""
        super().save_pretrained(save_directory, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        if self.text_tokenizer is not None:
            self.text_tokenizer.save_pretrained(save_directory)
        self.image_processor.save_pretrained(save_directory)
        generation = getattr(self.llm, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any
    ) -> Ovis:
        """Load a directory written by `save_pretrained` (offline: it is self-contained).

        attn_implementation: "auto" (the default) = flash_attention_2 where flash-attn and a GPU are present,
        else sdpa: right for chat and generation; the trainer passes its packed-training choice.
        """
        attn_implementation = kwargs.pop("attn_implementation", "auto")
        if attn_implementation == "auto":
            attn_implementation = default_attn_implementation(packed=False)
        kwargs.setdefault("local_files_only", True)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if isinstance(model, tuple):  # output_loading_info=True
            return model
        directory = Path(pretrained_model_name_or_path)
        if (directory / "tokenizer_config.json").exists():
            model.text_tokenizer = AutoTokenizer.from_pretrained(directory)
        if (directory / IMAGE_PROCESSOR_CONFIG).exists():
            model.image_processor = OvisImageProcessor.from_pretrained(directory)
        if (directory / "generation_config.json").exists():
            from transformers import GenerationConfig

            model.llm.generation_config = GenerationConfig.from_pretrained(directory)
        if attn_implementation != model.attn_implementation:
            model.set_llm_attention(attn_implementation)
        return model

    # -- inference ----------------------------------------------------------------------------------------
    def chat(self, images: Any, text: str, **kwargs: Any) -> Any:
        """See `ovis_model.chat.chat`."""
        return chat(self, images, text, **kwargs)
