"""A small multiple-choice benchmark made from the demo corpus, in VLMEvalKit's TSV format (what
`ovis-eval` reads): per single-image conversation of the given datasets, its first question, its first
answer's first sentence as the right option and three other conversations' as distractors, in a seeded
order; the image as base64, as VLMEvalKit's own files hold it."""

from __future__ import annotations

import base64
import csv
import random
from pathlib import Path

import pyarrow.parquet as pq

from .constants import IMAGE_MARK
from .imagestore import ImageStore
from .registry import DatasetSpec
from .storage import as_path
from .validate.catalog import catalog_path

COLUMNS = [
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


def _first_sentence(text: str) -> str:
    head = text.strip().split(". ")[0].strip()
    return head if head.endswith(".") else head + "."


def write_demo_bench(
    root: Path, specs: list[DatasetSpec], path: Path, per_dataset: int = 3, seed: int = 0
) -> int:
    """Write the bench to `path` from the validated catalogs of `specs` (conversation datasets with
    images); returns its number of questions."""
    rng = random.Random(seed)
    items = []  # (dataset, question, right answer, image bytes)
    for spec in specs:
        if (
            spec.data_format != "conversation"
            or not spec.image_dir
            or not catalog_path(root, spec.name).exists()
        ):
            continue
        store = ImageStore(as_path(spec.image_path(root)))
        taken = 0
        for row in pq.read_table(
            catalog_path(root, spec.name), columns=["images", "roles", "texts"]
        ).to_pylist():
            roles, texts = row["roles"] or [], row["texts"] or []
            turns = [(r, t) for r, t in zip(roles, texts, strict=False) if r in ("human", "gpt")]
            if len(row["images"] or []) != 1 or len(turns) < 2 or turns[0][0] != "human":
                continue
            question = turns[0][1].replace(IMAGE_MARK, "").strip()
            items.append(
                (spec.name, question, _first_sentence(turns[1][1]), store.read_bytes(row["images"][0]))
            )
            taken += 1
            if taken == per_dataset:
                break
    answers = sorted({a for _, _, a, _ in items})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        for i, (dataset, question, right, image) in enumerate(items):
            others = [a for a in answers if a != right]
            options = [right, *rng.sample(others, 3)]
            rng.shuffle(options)
            writer.writerow(
                {
                    "index": i,
                    "question": question,
                    "hint": "",
                    **dict(zip("ABCD", options, strict=True)),
                    "answer": "ABCD"[options.index(right)],
                    "category": dataset,
                    "l2-category": "demo",
                    "split": "dev",
                    "image": base64.b64encode(image).decode(),
                }
            )
    return len(items)
