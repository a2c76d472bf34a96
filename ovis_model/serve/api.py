"""The OpenAI-compatible API: `GET /v1/models`, `POST /v1/chat/completions` (JSON, or server-sent events
with `stream: true`, in OpenAI's chunk format) and `GET /health` (the queue's state)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..chat import ChatError, ChatResult
from .messages import ApiError, ChatRequest, Limits, parse_chat_request
from .worker import GenerationQueue, Job, QueueFull

FINISH = {"stop": "stop", "repetition": "stop", "length": "length", "cancelled": "stop"}


@dataclass(frozen=True)
class ApiSettings:
    model_name: str
    default_max_tokens: int = 512
    max_request_bytes: int = 64 * 2**20
    limits: Limits = Limits()


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI-style JSON errors for everything the API answers, FastAPI's own 404/405/422 included."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(400, f"malformed request: {e.errors()}"))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:  # logged by uvicorn as well
        return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}"))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        if not request.url.path.startswith("/v1/"):  # the page's routes keep their own answers
            return JSONResponse({"detail": e.detail}, status_code=e.status_code, headers=e.headers)
        return error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"))


def api_router(queue: GenerationQueue, settings: ApiSettings) -> APIRouter:
    router = APIRouter()
    runner = queue.runner

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "ovis-toolkit"}
        return {"object": "list", "data": [card]}

    @router.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, **queue.status()}

    @router.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        body = await _read_json(request, settings.max_request_bytes)

        def prepare() -> tuple[ChatRequest, Any]:
            parsed = parse_chat_request(
                body, settings.model_name, settings.default_max_tokens, settings.limits
            )
            try:
                return parsed, runner.prepare(parsed.images, parsed.query, parsed.history, parsed.system)
            except ChatError as e:
                raise ApiError(400, str(e), "messages") from e

        parsed, prepared = await run_in_threadpool(prepare)  # image decoding and tokenizing off the loop
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if not parsed.stream:
            job = _submit(queue, prepared, None, parsed.generation)
            result = await asyncio.wrap_future(job.future)
            return JSONResponse(_completion(completion_id, created, settings.model_name, result))

        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()

        def on_text(piece: str) -> None:  # called on the worker thread
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        job = _submit(queue, prepared, on_text, parsed.generation)  # a 503 here, before the stream opens
        job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
        events = _events(job, pieces, completion_id, created, settings.model_name, parsed.include_usage)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @router.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def unknown(request: Request, rest: str) -> JSONResponse:
        """Anything else under /v1 (the page, mounted at /, would answer it with HTML)."""
        known = {"models": "GET", "chat/completions": "POST"}
        if rest in known:
            raise ApiError(405, f"{request.method} /v1/{rest}: use {known[rest]}")
        raise ApiError(
            404, f"{request.method} /v1/{rest}: no such endpoint (GET /v1/models, POST /v1/chat/completions)"
        )

    return router


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413, f"the request has {int(declared):,} bytes; the limit is {limit:,}", None, "request_too_large"
        )
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(
                413, f"the request is over the limit of {limit:,} bytes", None, "request_too_large"
            )
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from e


def _submit(queue: GenerationQueue, prepared: Any, on_text: Any, generation: dict[str, Any]) -> Job:
    try:
        return queue.submit(prepared, on_text=on_text, **generation)
    except QueueFull as e:
        raise ApiError(503, str(e), None, "queue_full") from e
    except ChatError as e:
        raise ApiError(400, str(e)) from e


def _usage(result: ChatResult) -> dict[str, int]:
    """prompt_tokens counts what the LLM reads: text tokens plus each image's visual tokens."""
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.output_tokens,
        "total_tokens": result.total_tokens,
    }


def _completion(completion_id: str, created: int, model: str, result: ChatResult) -> dict[str, Any]:
    message = {"role": "assistant", "content": result.output}
    choice = {"index": 0, "message": message, "finish_reason": FINISH[result.finish_reason], "logprobs": None}
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": _usage(result),
    }


async def _events(
    job: Job, pieces: asyncio.Queue, completion_id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """The answer as OpenAI's chunks: the role, the text pieces, the finish reason, the usage when asked,
    then [DONE]. A client that goes away cancels its generation at the next token."""

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
            **extra,
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while (piece := await pieces.get()) is not None:
            yield chunk({"content": piece})
        try:
            result = job.future.result()
        except Exception as e:  # the stream is open: the error goes in an event of its own
            yield f"data: {json.dumps(ApiError(500, f'generation failed: {e}').body())}\n\n"
            return
        yield chunk({}, FINISH[result.finish_reason])
        if include_usage:
            body = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": _usage(result),
            }
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()  # a no-op once finished
