"""Text throughput of pack: ours (batched tokenization + best-fit packing) beside the original's
per-sample path (format one sample, tokenize each turn alone, re-tokenize the whole prompt for its
assertion, make tensors, as Ovis v1's dataset classes did), on the same samples and tokenizer.

    python benchmarks/pack_throughput.py [--conversations 20000] [--captions 50000]

Images are left out on both sides: reading and resizing them costs the same per image in either path.
Everything runs on one core (TOKENIZERS_PARALLELISM=false): pack gets its other cores from processes,
as the original got them from DataLoader workers. Ours runs twice, with tokenizers and with the tiktoken
twin that pack uses for conversations where it qualifies (fastbpe.py; captions, short plain texts, stay
with tokenizers' batch call, faster there); the two must give the same ids (hash checked). Packing,
which the original did not do, is timed apart and added to our best line ("+ packing"); its LP prices
are a fixed cost of a second or two per call, small in a real pack of millions of samples.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import time

import numpy as np
import torch
from pack_corpus import VISUAL_TOKENS, captions, qwen_path, stage3_conversations
from tokenizers import Tokenizer

from ovis_data.pack.packing import best_fit_decreasing, pack_lengths
from ovis_data.pack.templates import detect_chat_format
from ovis_data.pack.tokenize import SampleEncoder, load_tokenizer

IGNORE_ID, IMAGE_ID, IMAGE_MARK = -100, -200, "<image>"
BATCH = 4096


class OriginalQwenFormatter:
    """Ovis v1's QwenConversationFormatter (with the later release's newline rule), as it ran per sample."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.from2role = {
            "system": "<|im_start|>system\n",
            "human": "<|im_start|>user\n",
            "gpt": "<|im_start|>assistant\n",
        }
        self.gpt_token_num = None
        self.im_end = "<|im_end|>\n"
        self.default_system_prompt = "You are a helpful assistant."

    def _tokenize_with_image_symbol(self, text):
        chunks = [self.tokenizer(c, add_special_tokens=False).input_ids for c in text.split(IMAGE_MARK)]
        ids = []
        for i, chunk in enumerate(chunks):
            ids.extend(chunk)
            if i < len(chunks) - 1:
                ids.append(IMAGE_ID)
        return ids

    def format(self, conversations):
        if self.gpt_token_num is None:
            self.gpt_token_num = len(
                self.tokenizer(self.from2role["gpt"], add_special_tokens=False).input_ids
            )
        if conversations[0]["from"] != "system":
            conversations.insert(0, {"from": "system", "value": self.default_system_prompt})
        prompt, input_ids, labels = "", [], []
        for conversation in conversations:
            frm = conversation["from"]
            text = self.from2role[frm] + conversation["value"] + self.im_end
            prompt += text
            token_ids = self._tokenize_with_image_symbol(text)
            input_ids.extend(token_ids)
            label_ids = [IGNORE_ID] * len(token_ids)
            if frm == "gpt":
                label_ids[self.gpt_token_num : -1] = token_ids[self.gpt_token_num : -1]
            labels.extend(label_ids)
        assert self._tokenize_with_image_symbol(prompt) == input_ids
        return prompt, input_ids, labels


def original_conversations(tokenizer, samples) -> int:
    fmt = OriginalQwenFormatter(tokenizer)
    tokens = 0
    for sample in samples:  # ConversationDataset.__getitem__, text part
        conversations = copy.deepcopy(sample["conversations"])
        _, input_ids, labels = fmt.format(conversations)
        input_ids = torch.tensor(input_ids, dtype=torch.long)
        labels = torch.tensor(labels, dtype=torch.long)
        tokens += len(input_ids)
    return tokens


def original_captions(tokenizer, texts, template="<image>'s caption: ") -> int:
    tokens = 0
    for text in texts:  # CaptionDataset.__getitem__, text part
        text = text.replace(IMAGE_MARK, "").strip()
        head, tail = template.split(IMAGE_MARK)
        head_ids = tokenizer(head, add_special_tokens=False).input_ids
        tail_ids = tokenizer(tail, add_special_tokens=False).input_ids
        text_ids = tokenizer(text, add_special_tokens=False).input_ids
        input_ids = head_ids + [IMAGE_ID] + tail_ids + text_ids
        labels = [IGNORE_ID] * (len(input_ids) - len(text_ids)) + text_ids
        input_ids = torch.tensor(input_ids, dtype=torch.long)
        labels = torch.tensor(labels, dtype=torch.long)
        tokens += len(input_ids)
    return tokens


def ours(encoder, samples=None, caption_texts=None, capacity=2048) -> tuple[int, str, np.ndarray, np.ndarray]:
    """Tokens encoded, a hash of every id and label (both engines must give the same), and the true
    lengths and image counts of the samples kept for packing."""
    lengths, images, tokens = [], [], 0
    digest = hashlib.sha256()
    n = len(samples) if samples is not None else len(caption_texts)
    for s in range(0, n, BATCH):
        if samples is not None:
            part = samples[s : s + BATCH]
            enc = encoder.encode_conversations(
                [[t["from"] for t in x["conversations"]] for x in part],
                [[t["value"] for t in x["conversations"]] for x in part],
            )
        else:
            enc = encoder.encode_captions(caption_texts[s : s + BATCH])
        true_len = enc.lengths + (VISUAL_TOKENS - 1) * enc.n_images
        keep = (true_len <= capacity) & (enc.n_supervised > 0)
        lengths.append(true_len[keep])
        images.append(enc.n_images[keep])
        tokens += len(enc.ids)
        digest.update(enc.ids.tobytes() + enc.supervised.tobytes() + enc.offsets.tobytes())
    return tokens, digest.hexdigest(), np.concatenate(lengths), np.concatenate(images)


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def main() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=20_000)
    ap.add_argument("--captions", type=int, default=50_000)
    args = ap.parse_args()
    tok = load_tokenizer(qwen_path())
    convs = stage3_conversations(args.conversations)
    caps = captions(args.captions)
    print(f"{'samples':<34} {'path':<28} {'samples/s':>10} {'tokens/s':>11} {'ratio':>7}")
    for name, peer, run in [
        (
            f"{len(convs):,} stage-3 conversations",
            lambda: original_conversations(tok, convs),
            lambda e: ours(e, samples=convs),
        ),
        (
            f"{len(caps):,} stage-1 captions",
            lambda: original_captions(tok, caps),
            lambda e: ours(e, caption_texts=caps),
        ),
    ]:
        n = len(convs) if "conv" in name else len(caps)
        tokens, t_peer = timed(peer)
        print(
            f"{name:<34} {'original, per sample':<28} {n / t_peer:>10,.0f} "
            f"{tokens / t_peer:>11,.0f} {1:>6.2f}x"
        )
        # Conversations: tokenizers alone, then the default (the tiktoken twin); captions always use
        # tokenizers' batch call (faster for short plain texts), so they get one line.
        engines = (False, True) if "conv" in name else (False,)
        digests, best = set(), {}
        for use_twin in engines * 2:  # alternated, best of two: the order must not matter
            # A fresh backend too: the original's run must not leave its word cache warm for ours.
            fresh = Tokenizer.from_str(tok.backend_tokenizer.to_str())
            encoder = SampleEncoder(fresh, detect_chat_format(tok), use_twin=use_twin)
            encoder.encode_conversations([["human", "gpt"]], [["hi", "ok"]])  # set up, as before timing
            (tokens_ours, digest, kept, kept_images), t = timed(run, encoder)
            assert tokens_ours == tokens, (tokens_ours, tokens)
            digests.add(digest)
            best[use_twin] = min(t, best.get(use_twin, t))
        assert len(digests) == 1, "the two engines gave different ids"
        for use_twin in engines:
            label = "ours (tiktoken twin)" if use_twin else "ours (tokenizers)"
            t = best[use_twin]
            print(
                f"{'':<34} {label + ', 1 core':<28} {n / t:>10,.0f} {tokens / t:>11,.0f} {t_peer / t:>6.2f}x"
            )
        # Packing, which the original did not do (it padded): shown apart, and added to the best line.
        for label, packer in (
            ("packing (pack_lengths)", pack_lengths),
            ("packing (BFD)", best_fit_decreasing),
        ):
            _, t_pack = timed(packer, kept, 2048, images=kept_images, max_images=32)
            t = best[engines[-1]] + t_pack
            print(
                f"{'':<34} {'+ ' + label:<28} {n / t:>10,.0f} {tokens / t:>11,.0f} {t_peer / t:>6.2f}x"
                f"   (packing alone {len(kept) / t_pack:,.0f} samples/s)"
            )


if __name__ == "__main__":
    main()
