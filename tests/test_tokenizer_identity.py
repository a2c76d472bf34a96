"""tokenizer_identity: the vocabulary hash survives `save_pretrained`, which rewrites the files."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from ovis_data.pack.tokenize import bundled_qwen_tokenizer_dir, tokenizer_identity, vocab_identity


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
