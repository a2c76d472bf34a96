"""`OvisRunner`: load a trained model folder once, then answer questions about images (one at a time, in
batches, or streamed). The one generation path of `ovis-chat`, its web page and API, and `chat()`.

    runner = OvisRunner("run/stage3/model")                   # cuda if present, bf16 there
    runner.run(["cat.jpg"], "What is this?").output           # greedy, like the original's runner
    runner.run_batch([(["a.jpg"], "Describe."), ([], "Hi")])  # left-padded batch, same answers
    for piece in runner.stream(["cat.jpg"], "Describe."):     # text as it is generated
        print(piece, end="")
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from .batching import expand_image_placeholders
from .chat import ChatError, ChatResult, build_query, load_images
from .constants import IMAGE_TOKEN
from .prompt import FORMATS, generation_prompt, stop_ids

# A degenerate loop ("a a a ...", the same sentence again and again) is cut once the last REPEAT_WINDOW
# tokens repeat a cycle of at most MAX_PERIOD tokens (4+ repeats): small tiny or under-trained models
# loop until max_new_tokens otherwise. Real answers are never exactly periodic over 64 tokens.
REPEAT_WINDOW = 64
MAX_PERIOD = 16

History = Sequence[tuple[str, str]]  # earlier (user, assistant) turns; users' `<image>` markers placed


@dataclass
class Prepared:
    """One conversation, tokenized and ready for the model."""

    prompt: str
    ids: np.ndarray  # image placeholders expanded to the visual tokens
    images: list[Image.Image]


@dataclass
class Generation:
    """Decoding settings (the keyword arguments of `run`, `run_batch` and `stream`).

    Greedy by default, as the original's runner. `seed` seeds torch's RNG before sampling.
    `stop_on_repetition` cuts degenerate loops (see REPEAT_WINDOW). `min_new_tokens` delays the stop
    tokens (a generation that must run long, e.g. to test a queue).
    """

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop_on_repetition: bool = True
    min_new_tokens: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ChatError(f"max_new_tokens must be at least 1, not {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ChatError(f"temperature must be > 0 to sample, not {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ChatError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ChatError(f"top_k must be at least 1, not {self.top_k}")


class StepHook(StoppingCriteria):
    """Called by `generate` after every token with all generated ids: streams text, stops rows that
    loop, and stops everything when cancelled. Records where and why each row stopped."""

    def __init__(
        self,
        batch: int,
        stop_on_repetition: bool,
        on_step: Callable[[list[int]], None] | None,
        cancel: threading.Event | None,
    ):
        self.stop_on_repetition = stop_on_repetition
        self.on_step = on_step
        self.cancel = cancel
        self.stopped_at: list[int | None] = [None] * batch
        self.reason: list[str | None] = [None] * batch

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        n = input_ids.shape[1]  # with inputs_embeds, generate's ids are the generated tokens only
        if self.on_step is not None:
            self.on_step(input_ids[0].tolist())
        stop = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if self.stop_on_repetition and n >= REPEAT_WINDOW:
            tail = input_ids[:, -REPEAT_WINDOW:]
            for p in range(1, MAX_PERIOD + 1):
                stop |= (tail[:, p:] == tail[:, :-p]).all(dim=1)
        if self.cancel is not None and self.cancel.is_set():
            stop[:] = True
            self._mark(range(input_ids.shape[0]), n, "cancelled")
        else:
            self._mark(torch.nonzero(stop).flatten().tolist(), n, "repetition")
        return stop

    def _mark(self, rows: Any, n: int, reason: str) -> None:
        for r in rows:
            if self.stopped_at[r] is None:
                self.stopped_at[r], self.reason[r] = n, reason


class _TextDeltas:
    """Turns a growing list of token ids into new text pieces, holding back an unfinished character."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text, self.sent = tokenizer, on_text, ""

    def step(self, tokens: list[int]) -> None:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return  # half a multi-byte character, or a re-spaced prefix: wait for more
        if len(text) > len(self.sent):
            self.on_text(text[len(self.sent) :])
            self.sent = text

    def finish(self, output: str) -> None:
        if output.startswith(self.sent) and len(output) > len(self.sent):
            self.on_text(output[len(self.sent) :])
            self.sent = output


class OvisRunner:
    """A loaded Ovis model that answers questions about images.

    `model`: a model folder written by ovis-train (loaded on `device`, default cuda if present, in
    `dtype`, default bf16 on cuda and fp32 on cpu) or an already loaded `Ovis`. Not thread-safe: one
    generation at a time (the server queues requests).
    """

    def __init__(self, model: Any, device: str | None = None, dtype: str | None = None):
        if isinstance(model, (str, Path)):
            from .model_dir import load_for_chat

            model = load_for_chat(model, device=device, dtype=dtype)
        elif device is not None or dtype is not None:
            model = model.to(device=device, dtype=getattr(torch, dtype) if dtype else None)
        self.model = model.eval()
        self.tokenizer = model.text_tokenizer
        if self.tokenizer is None:
            raise ChatError("the model has no text tokenizer: load it with Ovis.from_pretrained(model_dir)")
        self.template = model.config.conversation_template
        if self.template is None:
            raise ChatError(
                f"config.conversation_template is unset; one of {sorted(FORMATS)} or chat_template"
            )
        stop = stop_ids(self.tokenizer, self.template)
        eos = model.llm.generation_config.eos_token_id
        stop += [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None and e not in stop]
        self.stop_ids = stop
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (stop[0] if stop else 0)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        """The LLM's position limit (prompt plus answer), when its config gives one."""
        return getattr(self.model.llm.config, "max_position_embeddings", None)

    # -- inputs --------------------------------------------------------------------------------------
    def prepare(self, images: Any, text: str, history: History = (), system: str | None = None) -> Prepared:
        """Tokenize one conversation. `images`: every image of the conversation in order (paths or PIL
        images); those of earlier turns belong to their `<image>` markers in `history`, the rest to
        `text`, where they lead unless `text` places its own markers."""
        pil_images = load_images(images)
        in_history = sum(user.count(IMAGE_TOKEN) for user, _ in history)
        if in_history > len(pil_images):
            raise ChatError(
                f"the history has {in_history} {IMAGE_TOKEN} markers but {len(pil_images)} images"
            )
        query = build_query(text, len(pil_images) - in_history)
        try:
            prompt, ids = generation_prompt(self.tokenizer, self.template, query, system, history)
        except ValueError as e:  # e.g. a system turn for a format without one
            raise ChatError(str(e)) from e
        expanded, _, _ = expand_image_placeholders(
            ids, [0] * len(ids), [len(ids)], self.model.num_visual_tokens
        )
        if self.context_length and len(expanded) >= self.context_length:
            raise ChatError(
                f"the conversation has {len(expanded)} tokens (images included); the model's context holds "
                f"{self.context_length}: start a new one"
            )
        return Prepared(prompt, np.asarray(expanded), pil_images)

    # -- generation ----------------------------------------------------------------------------------
    def run(
        self,
        images: Any,
        text: str,
        history: History = (),
        system: str | None = None,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        **generation: Any,
    ) -> ChatResult:
        """Answer `text` about `images` (paths, PIL images, or None). `history`: earlier (user, assistant)
        turns. `on_text(piece)` receives the answer as it is generated; setting `cancel` stops it.
        `generation`: the fields of `Generation` (max_new_tokens=512, do_sample, temperature, top_p,
        top_k, repetition_penalty, seed, stop_on_repetition=True, min_new_tokens)."""
        prepared = self.prepare(images, text, history, system)
        return self.generate([prepared], on_text=on_text, cancel=cancel, **generation)[0]

    def run_batch(
        self, items: Sequence[tuple[Any, str]], batch_size: int = 8, **generation: Any
    ) -> list[ChatResult]:
        """Answer many `(images, text)` questions, `batch_size` at a time (prompts of similar length
        together), in the order given. Greedy answers equal `run`'s one by one; sampled ones are
        seeded per batch, so they differ from `run`'s."""
        if batch_size < 1:
            raise ChatError(f"batch_size must be at least 1, not {batch_size}")
        prepared = [self.prepare(images, text) for images, text in items]
        order = sorted(range(len(prepared)), key=lambda i: len(prepared[i].ids))
        results: list[ChatResult | None] = [None] * len(prepared)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, result in zip(
                chunk, self.generate([prepared[i] for i in chunk], **generation), strict=True
            ):
                results[i] = result
        return [r for r in results if r is not None]

    def stream(
        self, images: Any, text: str, history: History = (), system: str | None = None, **generation: Any
    ) -> ChatStream:
        """`run` in a background thread: iterate the returned `ChatStream` for the answer's pieces; its
        `result` is the ChatResult once the iteration ends; `cancel()` stops the generation."""
        prepared = self.prepare(images, text, history, system)  # bad input fails here, in the caller
        return ChatStream(self, prepared, generation)

    @torch.inference_mode()
    def generate(
        self,
        batch: list[Prepared],
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        **generation: Any,
    ) -> list[ChatResult]:
        """The generation path: left-padded `inputs_embeds` with an attention mask (position ids follow
        the mask), stop ids of the chat format, then each row cut at its first stop token."""
        gen = Generation(**generation)
        gen.check()
        if on_text is not None and len(batch) != 1:
            raise ValueError("on_text streams one conversation, not a batch")
        model, device = self.model, self.device
        width = max(len(p.ids) for p in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p.ids) :] = torch.as_tensor(p.ids, dtype=torch.long)
            mask[row, width - len(p.ids) :] = 1
        images = [im for p in batch for im in p.images]
        dtype = model.get_input_embeddings().weight.dtype
        pixel_values = model.image_processor(images).to(device, dtype) if images else None
        inputs_embeds = model.embed_inputs(ids.to(device), pixel_values)

        max_new = gen.max_new_tokens
        if self.context_length and width >= self.context_length:
            raise ChatError(f"the prompt has {width} tokens; the model's context holds {self.context_length}")
        if self.context_length:  # never past the LLM's positions: the answer is cut there ("length")
            max_new = max(1, min(max_new, self.context_length - width))
        deltas = _TextDeltas(self.tokenizer, on_text) if on_text is not None else None
        hook = StepHook(len(batch), gen.stop_on_repetition, deltas.step if deltas else None, cancel)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": gen.do_sample}
        if gen.do_sample:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
        else:  # keep a checkpoint's sampling defaults from turning greedy decoding into a warning
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if gen.repetition_penalty is not None:
            kwargs["repetition_penalty"] = gen.repetition_penalty
        if gen.min_new_tokens:
            kwargs["min_new_tokens"] = min(gen.min_new_tokens, max_new)
        if gen.seed is not None:
            torch.manual_seed(gen.seed)
        output = model.llm.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=mask.to(device),
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
            stopping_criteria=StoppingCriteriaList([hook]),
            **kwargs,
        )
        results = []
        for row, p in enumerate(batch):
            tokens, reason = self._cut(output[row].tolist(), hook.stopped_at[row], hook.reason[row], max_new)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            results.append(ChatResult(p.prompt, text, len(p.ids), len(tokens), reason))
        if deltas is not None:
            deltas.finish(results[0].output)
        return results

    def _cut(
        self, tokens: list[int], stopped_at: int | None, reason: str | None, max_new: int
    ) -> tuple[list[int], str]:
        """A row's own tokens (with inputs_embeds, generate returns only new ones; a finished row is
        padded to the batch's length) and why it ended: "stop", "length", "repetition", "cancelled"."""
        stops = set(self.stop_ids)
        first_stop = next((i for i, t in enumerate(tokens) if t in stops), None)
        if first_stop is not None and (stopped_at is None or first_stop < stopped_at):
            return tokens[: first_stop + 1], "stop"
        if stopped_at is not None:
            return tokens[:stopped_at], reason or "stop"
        return tokens, "length" if len(tokens) >= max_new else "stop"


@dataclass
class ChatStream:
    """An answer being generated in a background thread: iterate for its text pieces; `result` once
    the iteration ends (an error in generation is raised by the iteration); `cancel()` stops it."""

    runner: OvisRunner
    prepared: Prepared
    generation: dict[str, Any]
    result: ChatResult | None = None
    _pieces: queue.Queue = field(default_factory=queue.Queue)
    _cancel: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._work, name="ovis-generate", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            self.result = self.runner.generate(
                [self.prepared], on_text=self._pieces.put, cancel=self._cancel, **self.generation
            )[0]
        except BaseException as e:  # handed to the iterating thread
            self._error = e
        finally:
            self._pieces.put(None)

    def __iter__(self) -> Iterator[str]:
        while (piece := self._pieces.get()) is not None:
            yield piece
        self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        self._cancel.set()
