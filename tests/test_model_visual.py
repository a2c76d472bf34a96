"""Visual tokenizer and visual embedding table."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, SiglipVisionConfig

from ovis_model.configuration import VisualTokenizerConfig
from ovis_model.embedding import VisualEmbedding
from ovis_model.tiny import tiny_ovis, tiny_vit_config
from ovis_model.visual_tokenizer import VisualTokenizer


def test_soft_lookup_is_probabilities_times_table() -> None:
    torch.manual_seed(0)
    vte = VisualEmbedding(64, 16)
    probs = torch.rand(3, 5, 64).softmax(-1)
    assert torch.allclose(vte(probs), probs @ vte.weight, atol=1e-6)
    ids = torch.tensor([[0, 62, 63]])
    assert torch.equal(vte(ids), vte.weight[ids])
    one_hot = torch.nn.functional.one_hot(ids, 64).float()
    assert torch.allclose(vte(one_hot), vte.weight[ids])
    # a distribution over the first V-2 words = the same distribution zero-padded to V
    short = torch.rand(2, 62).softmax(-1)
    assert torch.allclose(vte(short), torch.nn.functional.pad(short, (0, 2)) @ vte.weight, atol=1e-6)


def test_indicators_sit_at_v_minus_2_and_v_minus_1() -> None:
    model = tiny_ovis(visual_vocab_size=64, seed=1).eval()
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        tokens = model.visual_tokenizer(pixels)
        assert tokens.shape == (2, model.num_visual_tokens, 64)
        assert torch.equal(tokens[:, 0].argmax(-1), torch.tensor([62, 62]))
        assert torch.equal(tokens[:, -1].argmax(-1), torch.tensor([63, 63]))
        assert torch.equal(tokens[:, 0].sum(-1), torch.ones(2)) and (tokens[:, 1:-1, 62:] == 0).all()
        assert torch.allclose(tokens[:, 1:-1].sum(-1), torch.ones(2, model.num_visual_tokens - 2))
        # the model's embedding path equals the original's vte(visual_tokenizer(x)) on the full one-hot frame
        assert torch.allclose(model.visual_embeddings(pixels), model.vte(tokens), atol=1e-5)


def test_578_visual_tokens_per_336_clip_l14_image_on_meta() -> None:
    clip_l = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )  # fmt: skip
    config = VisualTokenizerConfig(backbone_config=clip_l, vocab_size=131072)
    with torch.device("meta"):
        vt = VisualTokenizer(config)
        tokens = vt(torch.empty(1, 3, 336, 336))
    assert config.num_visual_tokens == 578
    assert tokens.shape == (1, 578, 131072)
    assert vt.head[0].weight.shape == (131070, 1024)  # Linear(width, V-2, bias=False)
    assert vt.head[0].bias is None and vt.head[1].normalized_shape == (131070,)


def test_siglip_has_no_cls_to_drop_and_hidden_stride_merges() -> None:
    config = VisualTokenizerConfig(backbone_config=tiny_vit_config("siglip", image_size=56), vocab_size=32)
    vt = VisualTokenizer(config)
    assert config.drop_cls_token is False  # reset: SigLIP has no class token
    with torch.no_grad():
        assert vt(torch.randn(1, 3, 56, 56)).shape == (1, 16 + 2, 32)
    strided = VisualTokenizer(
        VisualTokenizerConfig(
            backbone_config=SiglipVisionConfig(**tiny_vit_config("siglip", image_size=56).to_dict()),
            vocab_size=32,
            hidden_stride=2,
        )
    )
    assert strided.head[0].in_features == 32 * 4
    with torch.no_grad():
        features = strided.encode(torch.randn(1, 3, 56, 56))
    assert features.shape == (1, 4, 128)


def test_clip_drops_cls() -> None:
    vt = VisualTokenizer(VisualTokenizerConfig(backbone_config=tiny_vit_config("clip"), vocab_size=32))
    with torch.no_grad():
        assert vt.encode(torch.randn(2, 3, 28, 28)).shape == (2, 4, 32)  # 2x2 patches, CLS dropped


@pytest.mark.parametrize("fn", ["gumbel_argmax", "st_argmax"])
def test_argmax_tokenize_functions_are_one_hot_with_gradients(fn: str) -> None:
    vt = VisualTokenizer(
        VisualTokenizerConfig(backbone_config=tiny_vit_config("clip"), vocab_size=32, tokenize_function=fn)
    )
    probs = vt.patch_probabilities(torch.randn(1, 3, 28, 28))
    assert torch.equal(probs.detach().max(-1).values, torch.ones(1, 4))
    assert torch.equal((probs.detach() > 0).sum(-1), torch.ones(1, 4, dtype=torch.long))
    probs[..., 0].sum().backward()
    assert vt.head[0].weight.grad.abs().sum() > 0


def test_unknown_tokenize_function_is_an_error() -> None:
    with pytest.raises(ValueError, match="tokenize_function"):
        VisualTokenizerConfig(backbone_config=tiny_vit_config("clip"), tokenize_function="argmax")
