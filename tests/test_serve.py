"""`ovis-chat MODEL_DIR --serve` as a user meets it: one server process on 127.0.0.1, its OpenAI-compatible
API through the official `openai` client (streaming and not, usage counts, bad requests, a full queue),
and its page in Debian's chromium driven by playwright.

The server serves a tiny model made here, or the model folder in $OVIS_SERVE_MODEL (e.g. the demo's
demo_out/run/stage3/model); with $OVIS_SCREENSHOTS set, the page test saves chat.png there (docs/chat.png
is made so: see docs/serving.md).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from ovis_data.fetch import serve_directory
from ovis_model import Ovis
from ovis_model.runner import OvisRunner
from ovis_model.serve.messages import ApiError, Limits, load_image_url
from ovis_model.tiny import write_tiny_parts

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
QUESTION = "What colour is it?"
MAX_NEW = 24  # the server's default budget: the page's too


@dataclass
class Served:
    base: str  # http://127.0.0.1:PORT
    name: str  # the API's model name
    model_dir: Path
    reference: OvisRunner  # the same model in this process: what the server must answer

    def client(self):  # noqa: ANN201
        from openai import OpenAI

        return OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _red() -> Image.Image:
    return Image.new("RGB", (60, 40), (200, 30, 30))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("serve")
    if os.environ.get("OVIS_SERVE_MODEL"):
        model_dir = Path(os.environ["OVIS_SERVE_MODEL"])
    else:
        llm_dir, vit_dir = write_tiny_parts(root)
        model_dir = root / "model"
        Ovis.from_parts(llm=llm_dir, vit=vit_dir, visual_vocab_size=64).save_pretrained(model_dir)
    # the API's model name: ovis-chat's default (MODEL_DIR as given) for a model named in the environment
    port, name = _free_port(), str(model_dir) if os.environ.get("OVIS_SERVE_MODEL") else "tiny-ovis"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), GRADIO_ANALYTICS_ENABLED="False")
    log = open(root / "server.log", "w+")  # noqa: SIM115 (read back on failure)
    cmd = [sys.executable, "-m", "ovis_model.chat_cli", str(model_dir), "--serve", "--port", str(port)]
    cmd += ["--queue-size", "1", "--max-image-mb", "1", "--max-new-tokens", str(MAX_NEW)]
    cmd += ["--model-name", name] if name == "tiny-ovis" else []
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if _get(f"{base}/health")["status"] == "ok":
                    break
            except OSError:
                pass
            log.seek(0)
            assert proc.poll() is None, f"the server exited: {log.read()[-3000:]}"
            assert time.monotonic() < deadline, f"the server did not start: {log.read()[-3000:]}"
            time.sleep(1)
        yield Served(base, name, model_dir, OvisRunner(model_dir, device="cpu"))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _image_then_text(uri: str, text: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": uri, "detail": "low"}}, {"type": "text", "text": text}]


def test_models_and_a_completion_with_its_usage(served: Served) -> None:
    client = served.client()
    assert [m.id for m in client.models.list().data] == [served.name]
    messages = [{"role": "user", "content": _image_then_text(_data_uri(_png(_red())), QUESTION)}]
    response = client.chat.completions.create(
        model=served.name, messages=messages, max_tokens=8, temperature=0
    )
    want = served.reference.run([_red()], QUESTION, max_new_tokens=8)
    assert response.choices[0].message.content == want.output
    assert response.choices[0].finish_reason == {"length": "length"}.get(want.finish_reason, "stop")
    # prompt_tokens counts what the LLM reads: the prompt's text tokens and the image's visual tokens
    text_tokens = len(served.reference.tokenizer(want.prompt.replace("<image>", ""))["input_ids"])
    usage = response.usage
    assert usage.prompt_tokens == text_tokens + served.reference.model.num_visual_tokens == want.prompt_tokens
    assert usage.completion_tokens == want.output_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streaming_gives_the_same_answer_in_pieces(served: Served) -> None:
    client = served.client()
    # lmms-eval sends the text before the image: the image still leads the question, as in training
    uri = _data_uri(_png(_red()))
    parts = [{"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": uri}}]
    stream = client.chat.completions.create(
        model=served.name,
        messages=[{"role": "user", "content": parts}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = [c.usage for c in chunks if c.usage is not None]
    want = served.reference.run([_red()], QUESTION, max_new_tokens=12)
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == want.output
    assert len(finish) == 1 and len(usage) == 1
    assert (usage[0].prompt_tokens, usage[0].completion_tokens) == (want.prompt_tokens, want.output_tokens)


def test_a_conversation_with_history(served: Served) -> None:
    client = served.client()
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": _image_then_text(_data_uri(_png(_red())), "What is it?")},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]},
    ]
    response = client.chat.completions.create(model=served.name, messages=messages, max_tokens=8)
    want = served.reference.run(
        [_red()],
        "And its colour?",
        history=[("<image> What is it?", "A red square.")],
        system="You are a helpful assistant.",
        max_new_tokens=8,
    )
    assert response.choices[0].message.content == want.output
    assert response.usage.prompt_tokens == want.prompt_tokens


def _noise_png(side: int) -> bytes:
    rng = np.random.default_rng(0)
    return _png(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(served: Served) -> None:
    url = f"{served.base}/v1/chat/completions"
    ok_text = {"role": "user", "content": "Hi"}

    def ask(content: list | str) -> dict:
        return {"model": served.name, "messages": [{"role": "user", "content": content}], "max_tokens": 2}

    big = _noise_png(700)  # ~1.4 MB of noise: over --max-image-mb 1
    assert len(big) > 2**20
    wide = Image.new("1", (9000, 5000))  # 45 megapixels in a few kB of PNG: over the pixel limit
    cases = [  # (body, status, what the error names)
        (b"{not json", 400, "not valid JSON"),
        ({"model": served.name}, 400, "messages"),
        ({"model": "gpt-4o", "messages": [ok_text]}, 404, "model_not_found"),
        (ask(_image_then_text(_data_uri(b"just text", "text/plain"), "?")), 400, "not a readable image"),
        (ask(_image_then_text(_data_uri(big), "?")), 413, "image_too_large"),
        (ask(_image_then_text(_data_uri(_png(wide)), "?")), 413, "9000x5000"),
        (ask(_image_then_text("https://example.com/cat.png", "?")), 400, "remote_images_disabled"),
        (ask(_image_then_text("data:image/png;base64,@@@", "?")), 400, "base64"),
        ({**ask("Hi"), "max_tokens": "ten"}, 400, "max_tokens"),
        ({**ask("Hi"), "stop": ["\n"]}, 400, "unsupported_parameter"),
        (
            {**ask("Hi"), "messages": [ok_text, {"role": "assistant", "content": "Hello"}]},
            400,
            "last message",
        ),
        ({**ask("Hi"), "messages": [{"role": "robot", "content": "Hi"}]}, 400, "role"),
        (ask([{"type": "input_audio", "input_audio": {}}]), 400, "content[0]"),
        (ask("<image> <image> two markers, no image"), 400, "markers"),
    ]
    with httpx.Client(timeout=300) as http:
        for body, status, named in cases:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post(url, content=raw, headers={"content-type": "application/json"})
            error = r.json()["error"]
            assert r.status_code == status, (named, r.text[:500])
            assert named in json.dumps(error) and error["message"] and error["type"], (named, error)
        assert http.get(url).status_code == 405
        assert http.get(f"{served.base}/v1/embeddings").json()["error"]["message"]
    from openai import BadRequestError, NotFoundError

    client = served.client()
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[ok_text])
    with pytest.raises(BadRequestError, match="temperature"):
        client.chat.completions.create(model=served.name, messages=[ok_text], temperature=5)
    # still serving, and answering right
    response = client.chat.completions.create(model=served.name, messages=[ok_text], max_tokens=3)
    assert response.choices[0].message.content == served.reference.run([], "Hi", max_new_tokens=3).output


def test_remote_images_only_when_allowed(tmp_path: Path) -> None:
    (tmp_path / "red.png").write_bytes(_png(_red()))
    with serve_directory(tmp_path) as base:
        image = load_image_url(f"{base}/red.png", "image", Limits(allow_remote_images=True))
        assert image.size == (60, 40) and image.getpixel((0, 0)) == (200, 30, 30)
        with pytest.raises(ApiError, match="--allow-remote-images"):
            load_image_url(f"{base}/red.png", "image", Limits())
        with pytest.raises(ApiError, match="could not fetch") as missing:
            load_image_url(f"{base}/gone.png", "image", Limits(allow_remote_images=True))
        assert missing.value.status == 400


def test_a_full_queue_answers_503(served: Served) -> None:
    """--queue-size 1: one generation runs, one waits, a third is turned away; the running one stops when
    its client goes away."""
    from openai import InternalServerError

    client = served.client()
    long_one = {
        "model": served.name,
        "messages": [{"role": "user", "content": "Tell me everything."}],
        "max_tokens": 100_000,  # cut to the model's context
        "ignore_eos": True,  # no stop token, no loop cut: it runs until its client leaves
        "stream": True,
    }
    waiting: dict = {}

    def second() -> None:
        waiting["response"] = client.chat.completions.create(
            model=served.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )

    with httpx.Client(timeout=300) as http:
        with http.stream("POST", f"{served.base}/v1/chat/completions", json=long_one) as running:
            assert running.status_code == 200
            lines = running.iter_lines()
            while '"content": ""' in (line := next(lines)) or not line.startswith("data:"):
                pass  # the role chunk; then the first piece of text: it is generating
            behind = threading.Thread(target=second)
            behind.start()
            deadline = time.monotonic() + 300
            while _get(f"{served.base}/health")["waiting"] < 1:
                assert time.monotonic() < deadline and behind.is_alive()
                time.sleep(0.2)
            assert _get(f"{served.base}/health")["running"] == 1
            with pytest.raises(InternalServerError) as full:
                client.chat.completions.create(
                    model=served.name, messages=[{"role": "user", "content": "Hi"}]
                )
            assert full.value.status_code == 503 and "busy" in full.value.message
        behind.join(timeout=600)  # the long one was cancelled when its stream closed
    assert not behind.is_alive()
    assert (
        waiting["response"].choices[0].message.content
        == served.reference.run([], "Hi", max_new_tokens=2).output
    )
    status = _get(f"{served.base}/health")
    assert (status["running"], status["waiting"]) == (0, 0)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no chromium: apt-get install chromium")
def test_the_page_in_a_real_browser(served: Served, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    image_path = tmp_path / "red.png"
    _red().save(image_path)
    first = served.reference.run([_red()], QUESTION, max_new_tokens=MAX_NEW)
    second = served.reference.run(
        [_red()], "Are you sure?", history=[(f"<image> {QUESTION}", first.output)], max_new_tokens=MAX_NEW
    )
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 820})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(f"{served.base}/", wait_until="load")
            question = page.locator("#question textarea")
            expect(question).to_be_visible(timeout=120_000)
            page.locator("#question input[type=file]").set_input_files(str(image_path))
            expect(page.locator("#question img")).to_have_count(1, timeout=60_000)  # the upload's preview
            question.fill(QUESTION)
            question.press("Enter")
            status = page.locator("#status")
            # the page reports what the model read and wrote: the image's visual tokens included
            expect(status).to_contain_text(
                f"{first.output_tokens} tokens; {first.prompt_tokens} in the prompt", timeout=300_000
            )
            conversation = page.locator("#conversation")
            expect(conversation).to_contain_text(QUESTION)
            expect(conversation.locator("img")).to_have_count(1)  # the image, shown in the user's turn
            answer = " ".join(first.output.split())[:12]
            if answer.isascii() and answer.replace(" ", "").isalnum():  # markdown renders it as is
                expect(conversation).to_contain_text(answer)
            if os.environ.get("OVIS_SCREENSHOTS"):
                page.screenshot(path=str(Path(os.environ["OVIS_SCREENSHOTS"]) / "chat.png"), full_page=True)
            # a second turn, on the same image: the history goes with it
            question.fill("Are you sure?")
            question.press("Enter")
            expect(status).to_contain_text(f"{second.prompt_tokens} in the prompt", timeout=300_000)
            expect(conversation).to_contain_text("Are you sure?")
            page.locator("#clear").click()
            expect(conversation).not_to_contain_text(QUESTION)
        finally:
            browser.close()
    assert not problems, problems
