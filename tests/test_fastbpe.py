"""The tiktoken twin: the same ids as Hugging Face tokenizers where it is used, refused where not."""

from __future__ import annotations

import json
import random

import pytest
import tiktoken
from test_templates_tokenizers import llama3_tokenizer
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from ovis_data.pack import fastbpe
from ovis_data.pack.fastbpe import tiktoken_twin
from ovis_data.pack.tokenize import bundled_qwen_tokenizer_dir, load_tokenizer

ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    " \t\n\r\u00a0\u3000",
    ".,;:!?'\"()[]{}<>/\\|@#$%^&*-_=+~`",
    "éèêëàâäôöûüçñÅßøæ\u0301\u0308",
    "日本語中文文本한국어",
    "русскийελληνικάעבריתالعربيةहिन्दीไทย",
    "😀👍🏽🇫🇷👨‍👩‍👧✓★→∑∞≠",
]
SPECIALS = ["<|im_start|>", "<|im_end|>\n", "<|begin_of_text|>", "<|eot_id|>", "'s", "'LL", "  ", "\n\n"]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pieces = []
        for _ in range(rng.randint(1, 12)):
            alphabet = rng.choice(ALPHABETS)
            pieces.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))))
            if rng.random() < 0.2:
                pieces.append(rng.choice(SPECIALS))
        out.append(("" if rng.random() < 0.5 else " ").join(pieces))
    return out + [fastbpe.PROBE, "", " ", "\n", "a" * 500]


@pytest.mark.parametrize("which", ["qwen2.5", "llama3-test"])
def test_twin_gives_the_same_ids_as_tokenizers(which: str) -> None:
    if which == "qwen2.5":
        backend = load_tokenizer(bundled_qwen_tokenizer_dir()).backend_tokenizer
    else:
        backend = llama3_tokenizer().backend_tokenizer
    twin = tiktoken_twin(backend)
    assert twin is not None, f"{which} is a plain byte-level BPE: it must qualify"
    for text in random_texts(3000):
        assert twin(text) == backend.encode(text, add_special_tokens=False).ids, text


def test_refused_where_tiktoken_would_differ() -> None:
    """Merges b+c then ab+c: BPE makes [a, bc] of "abc" (no a+bc merge), tiktoken, merging the pair of
    lowest rank, makes ab then abc. The twin is refused; built without the checks it would differ."""
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("b", "c"), ("ab", "c")]))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\S+|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    assert backend.encode("abc").ids == [0, 4]
    assert tiktoken_twin(backend) is None
    spec = json.loads(backend.to_str())
    naive = tiktoken.Encoding(
        "naive",
        pat_str=fastbpe._pattern(spec["pre_tokenizer"]),
        mergeable_ranks=fastbpe._ranks(spec["model"]["vocab"]),
        special_tokens={},
    )
    assert naive.encode("abc") == [5]
