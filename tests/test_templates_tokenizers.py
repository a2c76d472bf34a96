"""Real tokenizers for the template tests: the shipped Qwen2.5 one, and small byte-level BPEs trained here
that carry the Llama 3 and Gemma special tokens (their real vocabularies are not downloadable here)."""

from __future__ import annotations

import functools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ovis_data.pack.tokenize import bundled_qwen_tokenizer_dir

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_2|>",
    "<|eot_id|>",
]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
# Llama 3's pre-tokenizer regex (tiktoken cl100k style).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CORPUS = [
    "You are a helpful and honest multimodal assistant.",
    "What is shown in the picture? Describe the image in detail.",
    "The image shows a red bus parked beside a tall building on a sunny day.",
    "Answer the question using a single word or phrase.",
    "A cat sitting on a windowsill, looking at the birds outside. 🐱 naïve café Zürich 東京",
    "def main():\n    return 42\n\n\nprint('hello world')",
    "Question: how many people are there? Answer: three people are standing near the table.",
] * 20


def qwen_path() -> str:
    return str(bundled_qwen_tokenizer_dir())


@functools.cache
def qwen_tokenizer():
    return AutoTokenizer.from_pretrained(qwen_path())


def train_bpe(specials: list[str], split_regex: str | None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_regex is None)]
    if split_regex is not None:
        steps.insert(0, pre_tokenizers.Split(pattern=_tokenizers_regex(split_regex), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return tok


def _tokenizers_regex(pattern: str):
    from tokenizers import Regex

    return Regex(pattern)


@functools.cache
def llama3_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with Llama 3's pre-tokenizer regex and special tokens (no pad token, like Llama 3)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(LLAMA3_SPECIALS, _LLAMA3_SPLIT),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        name_or_path="test-llama3",
    )


@functools.cache
def gemma_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(GEMMA_SPECIALS, None),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        name_or_path="test-gemma",
    )


def save(tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    tokenizer.save_pretrained(str(path))
    return path


def test_llama3_test_tokenizer_has_its_special_tokens():
    tok = llama3_tokenizer()
    for t in LLAMA3_SPECIALS:
        assert len(tok(t, add_special_tokens=False).input_ids) == 1
    assert tok.pad_token is None
    assert tok("<|eot_id|>hi", add_special_tokens=False).input_ids[0] == tok.convert_tokens_to_ids(
        "<|eot_id|>"
    )


def test_saved_test_tokenizer_reloads_identically(tmp_path):
    tok = llama3_tokenizer()
    again = AutoTokenizer.from_pretrained(str(save(tok, tmp_path / "llama3")))
    text = "<|start_header_id|>user<|end_header_id|>\n\nWhat is shown? 🐱<|eot_id|>"
    assert again(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids
