"""Fill of packed sequences: ours (`pack_lengths`: LP-priced bin completion, what `pack` uses) beside
plain best-fit decreasing (`best_fit_decreasing`, our previous packer), the original's padded batches
and the greedy knapsack of LLaMA-Factory, at capacities 2048, 4096 (and 8192, to show where fill
saturates).

    pip install -c constraints.txt -e '.[bench]'   # scipy, for the LP bound
    python benchmarks/pack_fill.py [--n 100000] [--llava 665000]

fill = real tokens / tokens paid for (packs x capacity; or batches x 8 x longest for padded batches).
`ours s`, `BFD s`, `LP s`: CPU seconds of our packer, of BFD and of the LP bound on the row (one core;
CPU time, so that other load on the machine does not count); `row s`: wall seconds of the whole row.
Two upper bounds on the fill of any packing of these samples, each the fill at a lower bound on the
number of packs (neither is weaker than the other on every row, so both are shown):
  `bound`     Martello-Toth L2 and Fekete-Schepers dual feasible functions, on the true lengths;
  `LP bound`  ceil of the Gilmore-Gomory configuration LP (column generation, `lp_bound.py`) on the
              lengths rounded down to multiples of g = capacity / 1024 (never below ceil(tokens / C)).
              A `*` marks a row where the column generation hit its time limit: the figure is then the
              Farley bound of the last duals, still valid but possibly weaker than the LP.
The image cap (max_images=32) cannot bind here: every image costs >= 578 tokens, so a pack of 8192
holds at most 14 images; `report` checks this, since the LP ignores the cap.
"""

from __future__ import annotations

import argparse
import bisect
import time

import numpy as np
from lp_bound import configuration_lp_bound
from pack_corpus import VISUAL_TOKENS, llava665k_lengths, qwen_path, stage3_conversations

from ovis_data.pack.packing import best_fit_decreasing, pack_lengths
from ovis_data.pack.templates import detect_chat_format
from ovis_data.pack.tokenize import SampleEncoder, load_tokenizer


def padded_batches_fill(lengths: np.ndarray, batch: int = 8, seed: int = 0) -> float:
    """The original: random batches of 8, each padded to its longest sample."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    x = lengths[order]
    pad = (-len(x)) % batch
    longest = np.concatenate([x, np.zeros(pad, dtype=x.dtype)]).reshape(-1, batch).max(axis=1)
    return x.sum() / (longest.sum() * batch)


def greedy_knapsack(numbers: list[int], capacity: int) -> list[list[int]]:
    """LLaMA-Factory's packing (data/processor/processor_utils.py), verbatim in substance."""
    numbers.sort()
    knapsacks = []
    while numbers:
        current, remaining = [], capacity
        while True:
            index = bisect.bisect(numbers, remaining)
            if index == 0:
                break
            remaining -= numbers[index - 1]
            current.append(numbers.pop(index - 1))
        knapsacks.append(current)
    return knapsacks


def knapsack_fill(lengths: np.ndarray, capacity: int, chunk: int = 1000) -> float:
    """LLaMA-Factory packs within each `datasets.map` batch (preprocessing_batch_size, default 1000)."""
    packs = 0
    for s in range(0, len(lengths), chunk):
        packs += len(greedy_knapsack(lengths[s : s + chunk].tolist(), capacity))
    return lengths.sum() / (packs * capacity)


def bound_fill(lengths: np.ndarray, capacity: int) -> float:
    """Fill at the best lower bound on the number of packs we know how to compute: Martello-Toth L2 and
    the Fekete-Schepers dual feasible functions u_k (an item of x tokens needs at least u_k(x)/C packs),
    which capture that at most k items longer than C/(k+1) share a pack."""
    w = np.sort(np.asarray(lengths, dtype=np.int64))
    best = _l2_bound(w, capacity)
    for k in range(1, 40):
        scaled = (k + 1) * w
        u = np.where(scaled % capacity == 0, w * k, (scaled // capacity) * capacity)  # k * u_k(x)
        best = max(best, int(np.ceil(u.sum() / (k * capacity) - 1e-9)))
    return w.sum() / (best * capacity)


def _l2_bound(w: np.ndarray, capacity: int) -> int:
    """Martello-Toth L2 lower bound on the number of bins (w sorted)."""
    w = np.sort(w)
    csum = np.concatenate(([0], np.cumsum(w)))
    best = int(np.ceil(w.sum() / capacity))
    half = capacity // 2
    for alpha in range(0, half + 1, max(1, half // 512)):
        i1 = np.searchsorted(w, capacity - alpha, "right")  # w > C - alpha
        i2 = np.searchsorted(w, half, "right")  # w > C/2
        i3 = np.searchsorted(w, alpha, "left")  # w >= alpha
        n1, n2 = len(w) - i1, i1 - i2
        s2 = csum[i1] - csum[i2]
        s3 = csum[i2] - csum[i3]
        extra = max(0, int(np.ceil((s3 - (n2 * capacity - s2)) / capacity)))
        best = max(best, n1 + n2 + extra)
    return best


def lp_bound_fill(lengths: np.ndarray, capacity: int, time_limit: float) -> tuple[float, bool]:
    """Fill at ceil(configuration LP) packs (see the module doc), and whether the LP converged."""
    lp = configuration_lp_bound(lengths, capacity, g=max(1, capacity // 1024), time_limit=time_limit)
    packs = max(lp.packs, int(np.ceil(lengths.sum() / capacity)))
    return lengths.sum() / (packs * capacity), lp.converged


def demo_lengths(n: int) -> tuple[np.ndarray, np.ndarray]:
    tok = load_tokenizer(qwen_path())
    enc = SampleEncoder(tok, detect_chat_format(tok))
    samples = stage3_conversations(n)
    lengths, images = [], []
    for s in range(0, n, 4096):
        part = samples[s : s + 4096]
        e = enc.encode_conversations(
            [[t["from"] for t in x["conversations"]] for x in part],
            [[t["value"] for t in x["conversations"]] for x in part],
        )
        lengths.append(e.lengths + (VISUAL_TOKENS - 1) * e.n_images)
        images.append(e.n_images)
    return np.concatenate(lengths), np.concatenate(images)


def report(
    name: str, lengths: np.ndarray, images: np.ndarray, max_images: int = 32, lp_time: float = 35
) -> None:
    print(f"\n{name}: {len(lengths):,} samples, median true length {int(np.median(lengths))}")
    print(
        f"{'capacity':>8} {'kept':>8} {'ours':>7} {'BFD':>7} {'LP bound':>9} {'bound':>7} {'padded8':>8} "
        f"{'knapsack':>9} {'ours/padded':>12} {'ours/knap':>10} {'ours s':>7} {'BFD s':>6} {'LP s':>6} "
        f"{'row s':>6}"
    )
    has = images > 0
    tokens_per_image = (lengths[has] / images[has]).min() if has.any() else np.inf
    for cap in (2048, 4096, 8192):
        row = time.perf_counter()
        keep = lengths <= cap
        ln, im = lengths[keep], images[keep]
        if cap // tokens_per_image > max_images:
            raise SystemExit(f"max_images={max_images} may bind at capacity {cap}: the LP bound ignores it")
        t = time.process_time()
        ours = pack_lengths(ln, cap, images=im, max_images=max_images, seed=0).fill
        dt = time.process_time() - t
        t = time.process_time()
        bfd = best_fit_decreasing(ln, cap, images=im, max_images=max_images, seed=0).fill
        bfd_dt = time.process_time() - t
        padded = padded_batches_fill(ln)
        knap = knapsack_fill(ln, cap)
        bound = bound_fill(ln, cap)
        t = time.process_time()
        lp, converged = lp_bound_fill(ln, cap, lp_time)
        lp_dt = time.process_time() - t
        print(
            f"{cap:>8} {keep.mean():>8.2%} {ours:>7.2%} {bfd:>7.2%} {lp:>8.2%}{' ' if converged else '*'} "
            f"{bound:>7.2%} {padded:>8.2%} {knap:>9.2%} {ours / padded:>11.2f}x {ours / knap:>9.3f}x "
            f"{dt:>7.2f} {bfd_dt:>6.2f} {lp_dt:>6.1f} {time.perf_counter() - row:>6.1f}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000, help="stage-3 demo-mix samples")
    ap.add_argument("--llava", type=int, default=665_000, help="LLaVA-665k-like samples")
    ap.add_argument("--lp-time", type=float, default=35, help="seconds of column generation per row")
    args = ap.parse_args()
    report(
        "stage-3 mix of the demo corpus, scaled up (Qwen2.5 tokens)",
        *demo_lengths(args.n),
        lp_time=args.lp_time,
    )
    report("LLaVA-665k-like length distribution", *llava665k_lengths(args.llava), lp_time=args.lp_time)


if __name__ == "__main__":
    main()
