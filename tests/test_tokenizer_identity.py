"""tokenizer_identity: the vocabulary hash survives `save_pretrained`, which rewrites the files."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from ovis_data.pack.tokenize import (
    bundled_qwen_tokenizer_dir,
    load_tokenizer,
    tokenizer_identity,
    vocab_identity,
)


def test_vocab_hash_survives_save_pretrained_and_sees_an_added_token(tmp_path: Path):
    original = bundled_qwen_tokenizer_dir()
    tok = AutoTokenizer.from_pretrained(str(original))
    tok.save_pretrained(str(tmp_path / "saved"))
    a, b = tokenizer_identity(original), tokenizer_identity(tmp_path / "saved")
    assert a["sha256"] != b["sha256"]  # other files (no vocab.json / merges.txt), other bytes
    assert a["vocab_sha256"] == b["vocab_sha256"]
    # A loaded tokenizer (what the trainer holds) names the same vocabulary as its folder.
    assert vocab_identity(tok) == vocab_identity(tok.backend_tokenizer) == a["vocab_sha256"]

    tok.add_tokens(["<|one_more|>"])
    tok.save_pretrained(str(tmp_path / "added"))
    added = tokenizer_identity(tmp_path / "added")["vocab_sha256"]
    assert added != a["vocab_sha256"] and vocab_identity(tok) == added


def test_merges_as_strings_or_pairs_hash_the_same(tmp_path: Path):
    raw = json.loads((bundled_qwen_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    for name, merges in (("pairs", [m.split(" ") for m in ["a b", "ab c"]]), ("strings", ["a b", "ab c"])):
        raw["model"]["merges"] = merges
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(json.dumps(raw), encoding="utf-8")
    pairs, strings = (tokenizer_identity(tmp_path / n)["vocab_sha256"] for n in ("pairs", "strings"))
    assert pairs == strings


def test_without_tokenizer_json_the_files_hash_stands_in(tmp_path: Path):
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    identity = tokenizer_identity(tmp_path)
    assert identity["vocab_sha256"] == identity["sha256"] and identity["name"] == tmp_path.name


def test_a_folder_loads_once_until_its_files_change(tmp_path: Path):
    """load_tokenizer gives the object it loaded before while the folder's files are unchanged (each load
    of the Qwen2.5 tokenizer is ~0.6 s), and loads again once save_pretrained rewrote them."""
    from test_templates_tokenizers import llama3_tokenizer, save

    folder = save(llama3_tokenizer(), tmp_path / "tok")
    first = load_tokenizer(folder)
    assert load_tokenizer(folder) is first
    assert load_tokenizer(str(folder) + "/") is first  # the same folder spelt otherwise
    grown = llama3_tokenizer()
    grown.add_tokens(["<|one_more|>"])
    save(grown, folder)
    again = load_tokenizer(folder)
    assert again is not first and len(again) == len(first) + 1
    assert vocab_identity(again) == tokenizer_identity(folder)["vocab_sha256"] != vocab_identity(first)
