"""One FastAPI app on one port: the OpenAI-compatible API under /v1 (and /health), the Gradio page at /."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from ..runner import OvisRunner
from .messages import Limits


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 7860
    model_name: str = "ovis"
    queue_size: int = 8  # generations that may wait behind the running one; more get a 503
    default_max_tokens: int = 512
    limits: Limits = Limits()
    page: bool = True


def build_app(runner: OvisRunner, options: ServeOptions) -> Any:
    """The ASGI app (FastAPI): the API routes first, the page mounted at / behind them."""
    # no usage reports from Gradio: the server talks to nobody but its clients
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from fastapi import FastAPI

    from .api import ApiSettings, api_router, install_error_handlers
    from .worker import GenerationQueue

    queue = GenerationQueue(runner, options.queue_size)
    app = FastAPI(title=f"ovis-chat: {options.model_name}", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    settings = ApiSettings(options.model_name, options.default_max_tokens, limits=options.limits)
    app.include_router(api_router(queue, settings))
    app.state.generation_queue = queue
    if options.page:
        import gradio as gr

        from .page import build_page, page_style

        page = build_page(queue, options.model_name, options.default_max_tokens, options.limits)
        # Gradio's own queue lets every waiting page request reach ours, which orders them with the API's
        page.queue(default_concurrency_limit=options.queue_size + 1)
        app = gr.mount_gradio_app(
            app,
            page,
            path="/",
            max_file_size=options.limits.max_image_bytes,
            ssr_mode=False,
            **page_style(),
        )
    return app


def serve(runner: OvisRunner, options: ServeOptions) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn

    app = build_app(runner, options)
    base = f"http://{options.host}:{options.port}"
    print(
        f"serving {options.model_name!r}: the chat page at {base}/, the OpenAI-compatible API at {base}/v1 "
        f"(one generation at a time, {options.queue_size} may wait); Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning", access_log=False)
