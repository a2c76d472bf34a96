"""`ovis-eval` on VLMEvalKit-format TSV files made here: prompts, answer extraction, circular grouping,
bad rows and files, accuracies known in advance (a stand-in for the model's generation function whose
answers are chosen), and a real tiny model end to end through the command."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ovis_model.eval.bench import BenchError, open_bench
from ovis_model.eval.extract import extract_option, extract_yes_no
from ovis_model.eval.prompts import mcq_prompt, yorn_prompt
from ovis_model.eval.score import evaluate_bench

REPO = Path(__file__).resolve().parents[1]
OPTIONS = {"A": "a red square", "B": "a green square", "C": "a blue square", "D": "a white square"}
COLOURS = {"A": (220, 20, 20), "B": (20, 200, 20), "C": (20, 20, 220), "D": (250, 250, 250)}


def _b64(colour: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def _write_tsv(path: Path, header: list[str], rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, header, delimiter="\t", lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


MCQ_HEADER = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "l2-category",
    "split",
    "image",
]


def _mcq_rows(n: int) -> list[dict]:
    """n questions "What is shown?", the answer cycling A, B, C, D; categories by parity."""
    rows = []
    for i in range(n):
        answer = "ABCD"[i % 4]
        rows.append(
            {"index": i, "question": f"Q{i}: what is shown?", "hint": "" if i % 2 else "Look closely.",
             **OPTIONS, "answer": answer, "category": "even" if i % 2 == 0 else "odd",
             "l2-category": "colour", "split": "dev", "image": _b64(COLOURS[answer])}
        )  # fmt: skip
    return rows


def _preds(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")), delimiter="\t"))


class StandIn:
    """Answers chosen by question number: `good` questions get the right option's text (right in every
    rotation), the others the letter "A" (right only where A is the answer); every 5th unmatched text."""

    def __init__(self, good: set[int], garbage_every: int = 0) -> None:
        self.good, self.garbage_every, self.asked = good, garbage_every, []

    def __call__(self, items: list) -> list[str]:
        out = []
        for images, query in items:
            self.asked.append(query)
            assert query.startswith("<image>\n") and len(images) == 1
            n = int(query.split("Q", 1)[1].split(":", 1)[0])
            options = dict(
                line.split(". ", 1) for line in query.splitlines() if line[:2] in ("A.", "B.", "C.", "D.")
            )
            right = "ABCD"[n % 4]
            if self.garbage_every and n % self.garbage_every == 0:
                out.append("I cannot tell.")
            elif n in self.good:
                out.append(f"It is {OPTIONS[right]}.")  # the option's text, wherever rotation put it
                assert OPTIONS[right] in options.values()
            else:
                out.append("(A)")
        return out


def test_prompts_are_vlmevalkits_for_ovis() -> None:
    assert mcq_prompt("What?", {"A": "x", "B": "y"}, "Hint here") == (
        "Hint here\nWhat?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly."
    )
    assert mcq_prompt("What?", {"A": "x", "B": "y"}) == (
        "What?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly."
    )
    assert yorn_prompt("Is it red?") == "Is it red?\nAnswer the question using a single word or phrase."
    assert yorn_prompt("Is it red?", hallusionbench=True) == (
        "Is it red? Please answer yes or no.\nAnswer the question using a single word or phrase."
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B. a green square", "B"),
        ("The answer is C.", "C"),
        ("a blue square", "C"),  # the option's text, no letter
        ("It shows A Blue Square!", "A"),  # a lone capital A is read as the letter, as VLMEvalKit reads it
        ("A or B", None),  # two letters: ambiguous
        ("a red square or a green square", None),  # two option texts: ambiguous
        ("square", None),  # in every option's text, none's whole text
        ("I do not know", None),
        ("", None),
    ],
)
def test_option_extraction(text: str, expected: str | None) -> None:
    assert extract_option(text, OPTIONS) == expected


def test_yes_no_extraction() -> None:
    assert extract_yes_no("Yes.") == "Yes" and extract_yes_no("no, it is not") == "No"
    assert extract_yes_no("Yes and no") is None and extract_yes_no("maybe") is None


def test_accuracy_is_known_and_recomputed_from_the_predictions(tmp_path: Path) -> None:
    rows = _mcq_rows(12)
    rows[5]["image"] = "not base64 at all!" * 5  # broken base64
    rows[6]["image"] = ""  # no image
    rows[7]["answer"] = ""  # no answer
    # row 8 shares row 0's image (VLMEvalKit writes a short index instead of the base64 again)
    rows[8]["image"] = "0"
    path = _write_tsv(tmp_path / "MyBench.tsv", MCQ_HEADER, rows)
    stand_in = StandIn(good={0, 1, 2, 3, 8}, garbage_every=0)
    summary = evaluate_bench(path, tmp_path / "out", stand_in, batch_size=4)
    # scored: 0-4, 8-11 (9 rows); good: 0,1,2,3,8 right; 4 (answer A) right by "(A)"; 9, 10, 11 wrong
    assert summary["questions"] == 9 and summary["correct"] == 6
    assert summary["accuracy"] == pytest.approx(6 / 9)
    assert summary["skipped"] == 3
    reasons = {r["index"]: r["reason"] for r in summary["skipped_rows"]}
    assert "base64" in reasons["5"] and "no image" in reasons["6"] and "no answer" in reasons["7"]
    assert summary["by_category"]["even"] == {"n": 5, "correct": 4, "accuracy": 4 / 5}  # 0,2,4,8 | 10
    preds = _preds(tmp_path / "out" / "MyBench_predictions.tsv")
    assert len(preds) == 9 and sum(int(p["hit"]) for p in preds) / len(preds) == summary["accuracy"]
    assert (
        json.loads((tmp_path / "out" / "MyBench_summary.json").read_text())["accuracy"] == summary["accuracy"]
    )
    assert summary["chance"] == pytest.approx(0.25)
    assert "Look closely.\nQ0: what is shown?\nA. a red square" in stand_in.asked[0]


def test_circular_evaluation_makes_and_groups_rotations(tmp_path: Path) -> None:
    path = _write_tsv(tmp_path / "MMBench_like.tsv", MCQ_HEADER, _mcq_rows(8))
    summary = evaluate_bench(path, tmp_path / "out", StandIn(good={0, 1, 2}), circular=True)
    # good questions: right in all 4 rotations; the rest answer "A": right in exactly one rotation
    assert summary["circular"] and summary["questions"] == 8 and summary["asked"] == 32
    assert summary["correct"] == 3 and summary["accuracy"] == pytest.approx(3 / 8)
    assert summary["chance"] == pytest.approx(0.25**4)
    preds = _preds(tmp_path / "out" / "MMBench_like_predictions.tsv")
    groups: dict[int, list[int]] = {}
    for p in preds:
        groups.setdefault(int(p["index"]) % 1_000_000, []).append(int(p["hit"]))
    assert sorted(groups) == list(range(8)) and all(len(v) == 4 for v in groups.values())
    assert sum(all(v) for v in groups.values()) / len(groups) == summary["accuracy"]
    assert sum(map(sum, groups.values())) == 3 * 4 + 5  # every non-good question right once
    # a file that holds its rotations (VLMEvalKit's MMBench): grouped by index % 1e6, not rotated again
    rotated = [
        {**r, "index": int(p["index"]), "answer": p["answer"]}
        for p in preds
        for r in _mcq_rows(8)
        if r["index"] == int(p["index"]) % 1_000_000
    ]
    for r, p in zip(rotated, preds, strict=True):  # the options as the rotation made them
        k = int(p["index"]) // 1_000_000
        texts = list(OPTIONS.values())
        r.update({letter: texts[(i + k) % 4] for i, letter in enumerate("ABCD")})
    held = _write_tsv(tmp_path / "Held.tsv", MCQ_HEADER, rotated)
    again = evaluate_bench(held, tmp_path / "out2", StandIn(good={0, 1, 2}), circular=True)
    assert (again["questions"], again["asked"], again["correct"]) == (8, 32, 3)


def test_a_killed_run_resumes_with_the_same_key_only(tmp_path: Path) -> None:
    path = _write_tsv(tmp_path / "Resume.tsv", MCQ_HEADER, _mcq_rows(8))

    def killed(items: list) -> list[str]:
        if any("Q4:" in q for _, q in items):
            raise KeyboardInterrupt  # killed while the second batch is asked
        return StandIn(good={0, 1, 2, 3})(items)

    with pytest.raises(KeyboardInterrupt):
        evaluate_bench(path, tmp_path / "out", killed, batch_size=4, run_key="model-1")
    again = StandIn(good={0, 1, 2, 3})
    summary = evaluate_bench(path, tmp_path / "out", again, batch_size=4, run_key="model-1")
    assert (
        len(again.asked) == 4 and summary["questions"] == 8 and summary["correct"] == 4 + 1
    )  # Q4's answer is A
    other = StandIn(good=set())
    with pytest.raises(KeyboardInterrupt):
        evaluate_bench(path, tmp_path / "out", killed, batch_size=4, run_key="model-1")
    evaluate_bench(path, tmp_path / "out", other, batch_size=4, run_key="model-2")  # another model: all asked
    assert len(other.asked) == 8


def test_yes_no_bench_with_image_paths(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(tmp_path / "imgs" / "red.png")
    rows = [
        {"index": i, "question": f"Q{i}: is it red?", "answer": "Yes" if i % 2 == 0 else "No",
         "category": "colour", "image_path": "imgs/red.png"}
        for i in range(6)
    ]  # fmt: skip
    rows.append({"index": 6, "question": "Q6: is it red?", "answer": "Yes", "image_path": "imgs/gone.png"})
    path = _write_tsv(
        tmp_path / "HallusionBench.tsv", ["index", "question", "answer", "category", "image_path"], rows
    )

    def always_yes(items: list) -> list[str]:
        assert all("Please answer yes or no." in q for _, q in items)
        return ["Yes." if "Q0" not in q else "Hmm." for _, q in items]

    summary = evaluate_bench(path, tmp_path / "out", always_yes)
    assert summary["kind"] == "yorn" and summary["questions"] == 6 and summary["skipped"] == 1
    assert summary["correct"] == 2 and summary["unmatched"] == 1 and summary["chance"] == 0.5


def test_unusable_files_raise(tmp_path: Path) -> None:
    bad = _write_tsv(
        tmp_path / "noanswer.tsv", ["index", "question", "image"], [{"index": 0, "question": "q"}]
    )
    with pytest.raises(BenchError, match="missing column.*answer"):
        open_bench(bad)
    with pytest.raises(BenchError, match="no such file"):
        open_bench(tmp_path / "absent.tsv")
    binary = tmp_path / "image.tsv"
    binary.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)))
    with pytest.raises(BenchError, match="not a UTF-8"):
        open_bench(binary)


def _eval_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "ovis_model.eval", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_ovis_eval_command_with_a_real_tiny_model(tmp_path: Path) -> None:
    from test_templates_tokenizers import llama3_tokenizer, save

    from ovis_model.modeling import Ovis
    from ovis_model.tiny import write_tiny_parts

    tok = save(llama3_tokenizer(), tmp_path / "tok")
    llm, vit = write_tiny_parts(tmp_path / "parts", image_size=28, tokenizer_dir=tok)
    model = tmp_path / "model"
    Ovis.from_parts(llm=llm, vit=vit, visual_vocab_size=64).save_pretrained(model)
    rows = _mcq_rows(6)
    rows[3]["image"] = "%%%"
    mcq = _write_tsv(tmp_path / "Tiny.tsv", MCQ_HEADER, rows)
    p = _eval_cli(str(model), "--bench", str(mcq), "--out", str(tmp_path / "out"), "--max-new-tokens", "4",
                  "--batch-size", "2", "--circular")  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Tiny: accuracy" in p.stdout and "row 4 (index 3)" in p.stderr
    summary = json.loads((tmp_path / "out" / "Tiny_summary.json").read_text())
    preds = _preds(tmp_path / "out" / "Tiny_predictions.tsv")
    assert summary["questions"] == 5 and summary["asked"] == len(preds) == 20 and summary["skipped"] == 1
    groups: dict[int, bool] = {}
    for r in preds:
        g = int(r["index"]) % 1_000_000
        groups[g] = groups.get(g, True) and r["hit"] == "1"
    assert summary["accuracy"] == sum(groups.values()) / len(groups)
    assert summary["unmatched"] == sum(1 for r in preds if not r["extracted"])
    # an unusable file: one line, exit 2, before the model loads
    bad = _write_tsv(tmp_path / "Bad.tsv", ["index", "question", "image"], [{"index": 0, "question": "q"}])
    p = _eval_cli(str(model), "--bench", str(bad), "--out", str(tmp_path / "out"))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Bad.tsv" in lines[0]
