"""Samples rendered and tokenized as pack renders them (templates, SampleEncoder): exact token counts for
the histograms when the user gives a tokenizer, and the supervised spans of the gallery's samples."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..pack.templates import ChatFormat, ChatTemplateFormat, detect_chat_format, tokenizer_name
from ..pack.tokenize import Encoded, SampleEncoder, load_tokenizer

BATCH = 8192  # catalog rows tokenized at a time: bounded memory whatever the catalog's size


class SampleRenderer:
    """A tokenizer and the chat format pack would use with it (`template`: the recipe's, or auto)."""

    def __init__(self, tokenizer_dir: str | Path, template: str = "auto", source: str = ""):
        self.path = Path(tokenizer_dir)
        self.tok: Any = load_tokenizer(self.path)
        self.template = template
        self.source = source  # where the tokenizer came from, in words, for the page
        self._captions = SampleEncoder(self.tok)
        self._chat: SampleEncoder | None = None
        self._format: ChatFormat | ChatTemplateFormat | None = None

    @property
    def name(self) -> str:
        return tokenizer_name(self.tok)

    def chat_format_name(self) -> str:
        self._conversations()
        return getattr(self._format, "name", "chat_template")

    def _conversations(self) -> SampleEncoder:
        if self._chat is None:  # only conversation datasets need a chat format (it may be refused)
            self._format = detect_chat_format(self.tok, self.template)
            self._chat = SampleEncoder(self.tok, self._format)
        return self._chat

    def encode(self, data_format: str, rows: dict[str, list], caption_template: str | None) -> Encoded:
        """Columns of catalog rows (caption, or roles and texts) as pack tokenizes them."""
        if data_format == "caption":
            return self._captions.encode_captions(rows["caption"], caption_template)
        roles = [r or [] for r in rows["roles"]]
        texts = [t or [] for t in rows["texts"]]
        return self._conversations().encode_conversations(roles, texts)

    def text_tokens(
        self,
        catalog: Path,
        data_format: str,
        caption_template: str | None,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Per sample of a catalog: its tokens as pack renders it (template included, each image's
        placeholder not counted), batch by batch; samples the template refuses are left out."""
        pf = pq.ParquetFile(catalog)
        cols = ["caption"] if data_format == "caption" else ["roles", "texts"]
        parts = []
        done, total = 0, pf.metadata.num_rows
        for batch in pf.iter_batches(batch_size=BATCH, columns=cols):
            e = self.encode(data_format, batch.to_pydict(), caption_template)
            counts = (e.lengths - e.n_images).astype(np.int32)
            if e.errors:
                counts = np.delete(counts, sorted(e.errors))
            parts.append(counts)
            done += batch.num_rows
            if progress:
                progress(done, total)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
