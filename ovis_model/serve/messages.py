"""OpenAI chat-completion requests as Ovis conversations: the messages (text and `image_url` parts) become
a system prompt, earlier (user, assistant) turns and the question; the images are decoded and bounded; the
sampling fields become the runner's settings. Every problem is an ApiError naming the field."""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..chat import ChatError, build_query


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 503: "server_overloaded"}.get(
            self.status
        )
        if kind is None:
            kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may carry: image bytes and pixels, and whether http(s) image URLs are fetched."""

    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000  # e.g. 8000 x 5000; a decoded RGB image of that is 120 MB
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0


@dataclass
class ChatRequest:
    """A parsed request: what `OvisRunner.prepare` and `generate` take, and how to answer."""

    images: list[Image.Image]
    query: str
    history: list[tuple[str, str]]
    system: str | None
    generation: dict[str, Any]
    stream: bool = False
    include_usage: bool = False


# Fields that would change the answer in ways this server does not implement: refused unless at their
# default, so a harness never scores something other than it asked for. Others (user, metadata, store,
# service_tier, ...) are accepted and ignored.
_REFUSED_UNLESS = {
    "n": (None, 1),
    "stop": (None, [], ""),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "response_format": (None, {"type": "text"}),
}


def parse_chat_request(body: Any, model_name: str, default_max_tokens: int, limits: Limits) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: a string (GET /v1/models lists it)", "model")
    if model != model_name:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server has {model_name!r}",
            "model",
            "model_not_found",
        )
    for name, allowed in _REFUSED_UNLESS.items():
        if body.get(name) not in allowed:
            raise ApiError(
                400,
                f"{name!r} is not supported by this server (got {body[name]!r})",
                name,
                "unsupported_parameter",
            )
    generation = _generation(body, default_max_tokens)
    stream = _typed(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise ApiError(
            400, "'stream_options' must be an object, and only with stream: true", "stream_options"
        )
    include_usage = bool(options and options.get("include_usage"))
    system, history, query, images = _conversation(body.get("messages"), limits)
    return ChatRequest(images, query, history, system, generation, stream, include_usage)


def _typed(body: dict, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python; JSON's true is not a number
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        want = {bool: "a boolean", int: "an integer", (int, float): "a number"}.get(kind, str(kind))
        raise ApiError(400, f"{name!r} must be {want}, not {value!r}", name)
    return value


def _generation(body: dict, default_max_tokens: int) -> dict[str, Any]:
    """The runner's settings: temperature absent or 0 is greedy decoding (as the original's runner),
    above 0 samples; top_k, repetition_penalty and ignore_eos are the usual extensions (vLLM's names)."""
    max_tokens = _typed(body, "max_completion_tokens", int, None)
    max_tokens = _typed(body, "max_tokens", int, max_tokens)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"'max_tokens' must be at least 1, not {max_tokens}", "max_tokens")
    temperature = _typed(body, "temperature", (int, float), 0.0)
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"'temperature' must be between 0 and 2, not {temperature}", "temperature")
    top_p = _typed(body, "top_p", (int, float), None)
    if top_p is not None and not 0 < top_p <= 1:
        raise ApiError(400, f"'top_p' must be in (0, 1], not {top_p}", "top_p")
    top_k = _typed(body, "top_k", int, None)
    if top_k is not None and top_k <= 0:  # vLLM's -1 (and 0) mean no top-k
        top_k = None
    penalty = _typed(body, "repetition_penalty", (int, float), None)
    if penalty is not None and penalty <= 0:
        raise ApiError(400, f"'repetition_penalty' must be > 0, not {penalty}", "repetition_penalty")
    ignore_eos = _typed(body, "ignore_eos", bool, False)
    max_new_tokens = max_tokens or default_max_tokens
    generation: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": temperature > 0,
        "seed": _typed(body, "seed", int, None),
        # vLLM's benchmarking switch: run to max_tokens, through stop tokens and loops alike
        "min_new_tokens": max_new_tokens if ignore_eos else 0,
        "stop_on_repetition": not ignore_eos,
        "repetition_penalty": None if penalty in (None, 1, 1.0) else float(penalty),
    }
    if temperature > 0:
        generation.update(temperature=float(temperature), top_p=top_p, top_k=top_k)
    return generation


def _conversation(
    messages: Any, limits: Limits
) -> tuple[str | None, list[tuple[str, str]], str, list[Image.Image]]:
    """(system, history, question, images): system messages first, then user and assistant turns
    ending with a user turn (consecutive user messages are joined). Each user turn's images lead its
    text, as in training, unless the text places `<image>` markers itself."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    systems: list[str] = []
    turns: list[list[Any]] = []  # [role, texts, images]
    images: list[Image.Image] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        texts, found = _content(message.get("content"), where, limits, allow_images=role == "user")
        if role in ("system", "developer"):
            if turns:
                raise ApiError(400, f"{where}: a system message must come before the conversation", where)
            systems.append("\n".join(texts))
        elif role == "user":
            if turns and turns[-1][0] == "user":
                turns[-1][1] += texts
                turns[-1][2] += found
            else:
                turns.append(["user", texts, found])
        elif role == "assistant":
            if not turns or turns[-1][0] != "user":
                raise ApiError(400, f"{where}: an assistant message must follow a user message", where)
            turns.append(["assistant", texts, []])
        else:
            raise ApiError(400, f"{where}: role must be system, user or assistant, not {role!r}", where)
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must be a user message (the question)", "messages")
    placed: list[str] = []
    for k, (role, texts, found) in enumerate(turns):
        text = "\n".join(texts)
        if role == "user":
            if not text and not found:
                raise ApiError(400, f"user message {k // 2 + 1} has neither text nor an image", "messages")
            try:
                text = build_query(text, len(found))
            except ChatError as e:
                raise ApiError(400, f"user message {k // 2 + 1}: {e}", "messages") from e
            images += found
        placed.append(text)
    history = [(placed[j], placed[j + 1]) for j in range(0, len(placed) - 1, 2)]
    return ("\n".join(systems) if systems else None), history, placed[-1], images


def _content(
    content: Any, where: str, limits: Limits, allow_images: bool
) -> tuple[list[str], list[Image.Image]]:
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of parts", where)
    texts: list[str] = []
    images: list[Image.Image] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            if not allow_images:
                raise ApiError(400, f"{at}: only user messages may hold images", at)
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref  # {"url": ..., "detail": ...} or a string
            if not isinstance(url, str):
                raise ApiError(400, f"{at}: image_url must be {{'url': 'data:image/...;base64,...'}}", at)
            images.append(load_image_url(url, at, limits))
        else:
            raise ApiError(400, f"{at}: a part must be {{type: text, text}} or {{type: image_url}}", at)
    return texts, images


def load_image_url(url: str, where: str, limits: Limits) -> Image.Image:
    """A decoded image from a `data:` URI, or from an http(s) URL when the server allows it."""
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError(400, f"{where}: a data: URI must be base64, 'data:image/png;base64,...'", where)
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise _too_large(where, len(payload) * 3 // 4, limits)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"{where}: the data: URI is not valid base64 ({e})", where) from e
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise ApiError(
                400,
                f"{where}: image URLs are not fetched by this server; send the image as a data: URI "
                "(or start it with --allow-remote-images)",
                where,
                "remote_images_disabled",
            )
        data = _fetch(url, where, limits)
    else:
        raise ApiError(400, f"{where}: the image URL must be a data: URI or http(s)", where)
    return decode_image(data, where, limits)


def _too_large(where: str, size: int, limits: Limits) -> ApiError:
    return ApiError(
        413,
        f"{where}: the image has {size:,} bytes; the limit is {limits.max_image_bytes:,}",
        where,
        "image_too_large",
    )


def _fetch(url: str, where: str, limits: Limits) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=limits.remote_timeout_s) as response:  # noqa: S310
            data = response.read(limits.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ApiError(400, f"{where}: could not fetch {url} ({e})", where, "image_fetch_failed") from e
    if len(data) > limits.max_image_bytes:
        raise _too_large(where, len(data), limits)
    return data


def decode_image(data: bytes, where: str, limits: Limits) -> Image.Image:
    """Decoded pixels, refusing what is not an image and images over the pixel limit before decoding."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise ApiError(
                413,
                f"{where}: the image is {width}x{height} pixels; the limit is "
                f"{limits.max_image_pixels:,} pixels",
                where,
                "image_too_large",
            )
        image.load()
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ApiError(400, f"{where}: not a readable image ({e})", where, "invalid_image") from e
    return image
