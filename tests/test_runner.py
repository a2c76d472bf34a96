"""OvisRunner on a saved tiny model: batched generation equals one-by-one, streaming equals the answer,
multi-turn prompts, loops cut, cancellation, and ovis-chat's report of what it generated."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ovis_model import Ovis
from ovis_model.chat import ChatError
from ovis_model.runner import REPEAT_WINDOW, OvisRunner, StepHook
from ovis_model.tiny import write_tiny_parts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runner")
    llm_dir, vit_dir = write_tiny_parts(root)
    out = root / "model"
    Ovis.from_parts(llm=llm_dir, vit=vit_dir, visual_vocab_size=64, re_init_layers=1).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> OvisRunner:
    return OvisRunner(model_dir, device="cpu")


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (24 + 7 * i, 40, 3), dtype=np.uint8)) for i in range(n)]


def test_batch_equals_one_by_one(runner: OvisRunner) -> None:
    ims = _images(3)
    items = [
        ([ims[0]], "What is in the picture?"),
        ([], "Hello"),
        (ims[:2], "Compare the two images, in detail please, one after the other."),
        ([ims[2]], "Hi"),
        ([], "Tell me a long story about a cat and a dog"),
    ]
    alone = [runner.run(images, text, max_new_tokens=12) for images, text in items]
    batched = runner.run_batch(items, batch_size=3, max_new_tokens=12)
    assert batched == alone  # text, prompt, token counts and finish reason, row by row, in input order
    assert len({r.prompt_tokens for r in alone}) == len(items)  # really different lengths: padding ran
    # the prompt counts each image's visual tokens
    text_ids = runner.tokenizer(alone[3].prompt.replace("<image>", ""))["input_ids"]
    assert alone[3].prompt_tokens == len(text_ids) + runner.model.num_visual_tokens


def test_stream_pieces_make_the_answer(runner: OvisRunner) -> None:
    image = _images(1)[0]
    stream = runner.stream([image], "Describe it.", max_new_tokens=15)
    pieces = list(stream)
    assert pieces and "".join(pieces) == stream.result.output
    assert stream.result == runner.run([image], "Describe it.", max_new_tokens=15)
    seen: list[str] = []
    result = runner.run([image], "Describe it.", max_new_tokens=15, on_text=seen.append)
    assert "".join(seen) == result.output


def test_history_renders_the_earlier_turns(runner: OvisRunner) -> None:
    ims = _images(2)
    first = runner.prepare(ims[:1], "What is this?")
    second = runner.prepare(ims, "And this one?", history=[("<image> What is this?", "A cat.")])
    assert second.prompt.startswith(first.prompt)  # the first turn, as it was asked
    assert second.prompt.endswith(
        "<image> What is this?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\n<image> And this one?<|im_end|>\n<|im_start|>assistant\n"
    )
    tok = runner.tokenizer
    text_ids = tok(second.prompt.replace("<image>", ""))["input_ids"]
    assert len(second.ids) == len(text_ids) + 2 * runner.model.num_visual_tokens
    with pytest.raises(ChatError, match="2 <image> markers but 1 images"):
        runner.prepare(ims[:1], "Both?", history=[("<image> <image> Two?", "Yes.")])


def test_loops_are_cut_and_cancel_stops() -> None:
    period = [5, 6, 7]
    ids = torch.tensor([[1, 2, 3, 4] + period * 30, list(range(100, 100 + 4 + 90))])
    hook = StepHook(2, stop_on_repetition=True, on_step=None, cancel=None)
    assert hook(ids[:, : REPEAT_WINDOW - 1], None).tolist() == [False, False]  # not yet a full window
    assert hook(ids, None).tolist() == [True, False]
    assert hook.reason == ["repetition", None] and hook.stopped_at[0] == ids.shape[1]
    cancel = threading.Event()
    cancel.set()
    stopped = StepHook(2, stop_on_repetition=False, on_step=None, cancel=cancel)
    assert stopped(ids, None).tolist() == [True, True] and stopped.reason == ["cancelled", "cancelled"]


def test_a_looping_model_stops_early(runner: OvisRunner) -> None:
    # the tiny random model loops ("/>);" again and again): cut after a 64-token window, not at 300
    result = runner.run([], "Tell me", max_new_tokens=300, min_new_tokens=300)
    assert result.finish_reason == "repetition" and REPEAT_WINDOW <= result.output_tokens < 300
    # without the cut it goes on past that point to its length (16 tokens past it: each token of this
    # model costs its 151k-word head, so not all the way to 300)
    past = result.output_tokens + 16
    full = runner.run([], "Tell me", max_new_tokens=past, min_new_tokens=past, stop_on_repetition=False)
    assert full.finish_reason == "length" and full.output_tokens == past
    assert full.output.startswith(result.output)


def test_ovis_chat_reports_tokens(model_dir: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "ovis_model.chat_cli", str(model_dir), "Tell me", "--max-new-tokens", "200"]
    proc = subprocess.run([*cmd, "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["finish_reason"] == "repetition" and result["output_tokens"] < 200
    assert f"ovis-chat: {result['output_tokens']} tokens in " in proc.stderr
    assert "repeating itself" in proc.stderr


def test_ovis_chat_usage_errors_are_one_line(model_dir: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    chat = [sys.executable, "-m", "ovis_model.chat_cli", str(model_dir)]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = [  # (arguments, what the one line says)
            ([], "QUESTION is required"),
            (["--serve", "Hi"], "--serve takes no QUESTION"),
            (["--serve", "--port", port], f"cannot listen on 127.0.0.1:{port}"),
            (["--serve", "--queue-size", "-1"], "--queue-size"),
        ]
        procs = [
            subprocess.Popen(
                [*chat, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
            for args, _ in cases
        ]
        for (args, named), proc in zip(cases, procs, strict=True):
            out, err = proc.communicate(timeout=300)
            lines = err.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1 and named in lines[0], (args, err)
            assert lines[0].startswith("error: ") and "Traceback" not in out + err
