"""One benchmark file through the model: questions in batches, answers extracted and scored, results
written as DIR/<bench>_predictions.tsv and DIR/<bench>_summary.json.

Predictions: one line per question asked (circular copies included): `index`, `prediction` (the model's
text), `extracted` (the option letter or Yes/No read from it, empty when unmatched), `answer`, `hit` (1 or
0), `category`, `l2-category`. The summary's accuracy is recomputed from them: the mean of `hit`, or with
`--circular` the share of groups (`index % 1e6`) whose every line has `hit` 1. Unmatched answers count as
wrong; skipped rows (bad rows of the file) count nowhere but in `skipped`.

Circular evaluation (MMBench; VLMEvalKit's `mcq_circular_eval`, vlmeval/dataset/utils/multiple_choice.py):
a question is right only if every rotation of its options is. A file that already holds the rotations
(MMBench's: copies at index + k * 1e6) is grouped by `index % 1e6` as VLMEvalKit groups it; a file without
them gets them made (bench.rotations). Yes/no files are scored plainly.

Progress is written per batch to a `.partial` file; a killed run started again with the same `run_key`
(the command's: the model folder's weights, the generation settings, --circular) asks only the questions
not yet answered.
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .bench import MCQ, BadRow, Question, open_bench, read_questions, rotations
from .extract import extract_option, extract_yes_no
from .generate import AnswerFn
from .prompts import mcq_prompt, with_images, yorn_prompt

COLUMNS = ["index", "prediction", "extracted", "answer", "hit", "category", "l2-category"]


def query(q: Question, bench_name: str) -> str:
    """The text the model is asked for `q` (prompts.py), with its image markers."""
    if q.kind == MCQ:
        prompt = mcq_prompt(q.question, q.options, q.hint)
    else:
        prompt = yorn_prompt(q.question, hallusionbench="hallusionbench" in bench_name.lower())
    return with_images(prompt, len(q.images))


def _done_rows(partial: Path, run_key: str | None) -> dict[str, dict]:
    """Rows a killed run with the same key wrote (by index)."""
    key_file = partial.with_name(partial.name + ".key")
    if run_key is None or not partial.is_file() or not key_file.is_file() or key_file.read_text() != run_key:
        return {}
    with open(partial, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if reader.fieldnames != COLUMNS:
            return {}
        return {r["index"]: r for r in reader if r.get("hit") in ("0", "1")}


def evaluate_bench(
    path: str | Path,
    out_dir: str | Path,
    answer: AnswerFn,
    *,
    circular: bool = False,
    batch_size: int = 8,
    warn: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    run_key: str | None = None,
) -> dict:
    """Score one file (see the module doc); returns the summary, also written to DIR/<bench>_summary.json."""
    bench = open_bench(path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{bench.name}_predictions.tsv"
    partial = final.with_name(final.name + ".partial")
    done = _done_rows(partial, run_key)
    key_file = partial.with_name(partial.name + ".key")
    key_file.unlink(missing_ok=True)
    make_rotations = circular and bench.kind == MCQ and not bench.has_rotations
    results: list[dict] = []
    skipped: list[dict] = []
    pending: list[Question] = []
    seen = 0
    f = open(partial, "w", encoding="utf-8", newline="")  # noqa: SIM115 - closed below, rows flushed per batch
    writer = csv.DictWriter(f, COLUMNS, delimiter="\t", lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    if run_key is not None:
        key_file.write_text(run_key)

    def record(row: dict) -> None:
        writer.writerow(row)
        results.append(row)

    def flush() -> None:
        nonlocal seen
        if pending:
            texts = answer([(q.images, query(q, bench.name)) for q in pending])
            for q, text in zip(pending, texts, strict=True):
                got = extract_option(text, q.options) if q.kind == MCQ else extract_yes_no(text)
                hit = int(got == q.answer)
                record(_row(q, text, got or "", hit))
            pending.clear()
        f.flush()
        if progress:
            progress(seen, bench.rows)

    try:
        for item in read_questions(bench):
            seen += 1
            if (
                isinstance(item, Question)
                and circular
                and bench.kind == MCQ
                and not isinstance(item.index, int)
            ):
                item = BadRow(
                    item.row, str(item.index), "index is not an integer (circular groups by index % 1e6)"
                )
            if isinstance(item, BadRow):
                skipped.append({"row": item.row, "index": item.index, "reason": item.reason})
                if warn:
                    warn(f"{bench.path}: row {item.row} (index {item.index}): {item.reason}; skipped")
                continue
            for q in rotations(item) if make_rotations else [item]:
                if str(q.index) in done:
                    results.append(done[str(q.index)])
                    writer.writerow(done[str(q.index)])
                else:
                    pending.append(q)
            if len(pending) >= batch_size:
                flush()
        flush()
    finally:
        f.close()
    os.replace(partial, final)
    key_file.unlink(missing_ok=True)
    summary = summarize(results, circular=circular and bench.kind == MCQ)
    summary.update(
        bench=bench.name,
        file=str(bench.path),
        kind=bench.kind,
        rows=bench.rows,
        skipped=len(skipped),
        skipped_rows=skipped,
        predictions=str(final),
    )
    summary["chance"] = _chance(bench, results, summary["circular"])
    (out_dir / f"{bench.name}_summary.json").write_text(
        json.dumps(summary, indent=1, ensure_ascii=False) + "\n"
    )
    return summary


def _row(q: Question, text: str, got: str, hit: int) -> dict:
    return {
        "index": str(q.index),
        "prediction": text,
        "extracted": got,
        "answer": q.answer,
        "hit": str(hit),
        "category": q.category,
        "l2-category": q.l2_category,
        "_options": len(q.options),  # for the chance level; not written
    }


def summarize(rows: list[dict], circular: bool) -> dict:
    """Accuracy overall, per category and per l2-category, from prediction rows (as written)."""
    units: dict[str, list[dict]] = defaultdict(list)  # scored unit -> its rows
    for r in rows:
        key = str(int(r["index"]) % 1_000_000) if circular else r["index"]
        units[key].append(r)
    hits = {k: all(r["hit"] == "1" for r in rs) for k, rs in units.items()}

    def table(column: str) -> dict:
        per: dict[str, list[bool]] = defaultdict(list)
        for k, rs in units.items():
            if rs[0][column]:
                per[rs[0][column]].append(hits[k])
        return {
            c: {"n": len(v), "correct": sum(v), "accuracy": sum(v) / len(v)} for c, v in sorted(per.items())
        }

    n = len(units)
    return {
        "circular": circular,
        "questions": n,
        "asked": len(rows),
        "correct": sum(hits.values()),
        "accuracy": sum(hits.values()) / n if n else None,
        "unmatched": sum(1 for r in rows if not r["extracted"]),
        "by_category": table("category"),
        "by_l2_category": table("l2-category"),
    }


def _chance(bench, rows: list[dict], circular: bool) -> float | None:  # noqa: ANN001 - a Bench
    """What answering uniformly at random would score: 1/options per question (all n rotations right:
    (1/n)^n), 1/2 for yes/no."""
    if not rows:
        return None
    if bench.kind != MCQ:
        return 0.5
    n_opts = [int(r.get("_options") or 0) for r in rows]
    if not all(n_opts):  # rows of an earlier, killed run: their option counts are not kept
        return None
    if not circular:
        return sum(1 / k for k in n_opts) / len(n_opts)
    groups: dict[int, list[int]] = defaultdict(list)
    for r, k in zip(rows, n_opts, strict=True):
        groups[int(r["index"]) % 1_000_000].append(k)
    return sum(float(np.prod([1 / k for k in ks])) for ks in groups.values()) / len(groups)
