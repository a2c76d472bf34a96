"""The two vocabulary-wide products of a training step on a CPU: checkpointed chunks vs cache-sized tiles.

    python benchmarks/tiled_products.py [--rows 300 2000] [--repeats 3]

- LM loss: cross-entropy of `hidden @ W^T` over the Qwen2.5 vocabulary (151,665 words) for N supervised
  rows, forward + backward with the head trained (stages 2-3), hidden 32 (the demo's LLM) and 896
  (Qwen2.5-0.5B): `ovis_model.chunked.lm_loss_sum(tiled=False)` (the chunks) vs the default (tiles,
  ovis_model/tiled_loss.py);
- visual head: 576-patch images x 131,072 visual words (the recipes), ViT width 32, forward + backward:
  `soft_visual_embeddings(tiled=False)` vs the default (ovis_model/visual_head.py).

Best of `--repeats` per cell, in this process, on all cores torch uses. Prints a table with the ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def best(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="*", default=[300, 2000], help="supervised rows (LM loss)")
    ap.add_argument("--images", type=int, nargs="*", default=[1, 4], help="images (visual head)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from ovis_model.chunked import lm_loss_sum, soft_visual_embeddings
    from ovis_model.tiny import tiny_ovis

    torch.manual_seed(0)
    rows = ["| product | size | chunks | tiles | chunks / tiles |", "| --- | --- | ---: | ---: | ---: |"]
    for width in (32, 896):
        head = torch.nn.Linear(width, 151665, bias=False)
        for n in args.rows:
            hidden = torch.randn(n, width, requires_grad=True)
            targets = torch.randint(0, 151665, (n,))

            def step(tiled: bool, head=head, hidden=hidden, targets=targets) -> None:  # noqa: ANN001
                lm_loss_sum(head, hidden, targets, tiled=tiled).backward()

            cells = [best(lambda t=tiled: step(t), args.repeats) for tiled in (False, True)]
            rows.append(f"| LM loss | {n} rows, hidden {width} | {cells[0]:.2f} s | {cells[1]:.2f} s | "
                        f"{cells[0] / cells[1]:.2f}x |")  # fmt: skip
            print(rows[-1], flush=True)
    model = tiny_ovis(visual_vocab_size=131072, seed=0).train()
    vt = model.visual_tokenizer
    for images in args.images:
        features = torch.randn(images, 576, vt.head[0].in_features, requires_grad=True)

        def head_step(tiled: bool, features=features) -> None:  # noqa: ANN001
            soft_visual_embeddings(vt, model.vte, features, tiled=tiled).sum().backward()

        cells = [best(lambda t=tiled: head_step(t), args.repeats) for tiled in (False, True)]
        rows.append(f"| visual head | {images} x 576 patches, 131,072 words | {cells[0]:.2f} s | "
                    f"{cells[1]:.2f} s | {cells[0] / cells[1]:.2f}x |")  # fmt: skip
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
