"""Packing samples (by true length in tokens, with an image count each) into sequences of a fixed
capacity, under a cap on images per pack.

`pack_lengths` (what `pack` uses) comes within ~0.5 % of the configuration-LP lower bound on the number
of packs; plain best-fit decreasing (`best_fit_decreasing`, kept as the baseline) stays 4-5 % short at
capacities 2048 and 4096 (benchmarks/pack_fill.py). Why BFD loses: real lengths cluster (an image
costs 578 tokens, so most samples lie in 600..1000 tokens). Longest first, BFD fills its early packs
with the long items and whatever fits beside them, and leaves the middle of the distribution for the
end of each buffer: e.g. items of ~685 tokens, five of which leave 670 of 4096 tokens empty while six do
not fit. Near the bound every pack mixes long and short items in the right proportions, all along.

The algorithm (arrays throughout; a Python loop of a few operations per item, most packs search-free):
  1. Prices. The Gilmore-Gomory configuration LP of the length histogram (lengths rounded down to
     multiples of capacity/256, one buffer's expected counts) is solved by column generation, with a
     small dense simplex and a knapsack DP for pricing, in numpy. Its duals y(l) are what share of a
     pack an item of length l is worth. Where packs must waste tokens (at 2048, two items of 800 leave
     448 tokens that no item of 600+ fills), value is the dual: 1/2 for an 800, 0 for short fillers,
     so that packs are built LP-optimal (value 1), not merely full. Where they need not (the LP is
     within 0.1 % of the volume bound, as at 4096), value is length.
  2. Bin completion, per buffer of the seeded shuffle. One pack at a time: the longest item left opens
     it, then the room is filled by the best of (a) the one or two items of the largest value that fit
     (an exact search over the distinct lengths left, O(#lengths) in numpy) and (b) an item after which
     one or two others fill the room exactly (a count array of the sums of pairs left is kept up to
     date). Among equal values the lengths with the largest share of their items still unpacked win,
     which keeps what is left representative of the buffer. The pattern found for an opening length
     is repeated once more while its lengths last.
  3. Squeaky wheel. A greedy loses at the end of a buffer, where what is left is too uniform. So each
     buffer is packed `passes` times (the last buffer twice as many), the items of the poor packs of a
     pass (value short of 1 by more than 5 % and more than 1 % empty; with value = length, more than
     1 % empty) gaining priority to open packs in the next pass, while the buffer is still diverse. The
     pass with the fewest packs is kept. Its poor packs are carried into the next buffer (at most a
     quarter of a buffer; an item is carried once at most; the last buffer carries nothing), where
     their items open packs first.
Deterministic for a seed: the prices depend on the histogram only (pivot and round limits, not time;
tolerance-based tie rules; duals rounded to 2^-20 and then used as integers), the rest is integer
arithmetic and seeded permutations. Packs are emitted per buffer in a seeded random order, so data
order stays random at the pack level, and memory is bounded by a buffer plus what it carries.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from itertools import chain

import numpy as np

DEFAULT_BUFFER = 65536
DEFAULT_PASSES = 3
_PRICE_CLASSES = 256  # LP classes: lengths rounded down to multiples of capacity // 256
_PRICE_SCALE = 1 << 20  # duals are rounded to multiples of 2^-20 and used as integers
_POOR_FILL = 0.01  # a pack more than 1 % empty ...
_POOR_VALUE = 0.05  # ... and (when value is the dual) short of 1 by more than 5 % is poor: lengths sit
# up to capacity/256 above their LP class, so an LP-optimal pack of real items may fall a little short
_CARRY = 0.25  # at most this share of a buffer is carried into the next
_LAST = 1  # the last buffer, which cannot carry its poor packs on, gets (1 + _LAST) x the passes
_LP_GAP = 1e-3  # column generation stops once the Farley bound is this close to the master
_REUSE = 1  # times a pack pattern found for an opening length is repeated before searching again


@dataclass(frozen=True)
class Packing:
    """Packs as item indices: pack p holds `order[offsets[p]:offsets[p + 1]]`, in placement order."""

    order: np.ndarray  # int64
    offsets: np.ndarray  # int64, n_packs + 1
    capacity: int
    tokens: int  # real tokens packed (sum of the packed items' lengths)

    @property
    def n_packs(self) -> int:
        return len(self.offsets) - 1

    @property
    def fill(self) -> float:
        """Real tokens / (packs x capacity)."""
        return self.tokens / (self.n_packs * self.capacity) if self.n_packs else 0.0

    def pack(self, p: int) -> np.ndarray:
        return self.order[self.offsets[p] : self.offsets[p + 1]]

    def per_pack(self, values: np.ndarray) -> np.ndarray:
        """Sum of a per-item array over each pack (e.g. lengths -> tokens per pack)."""
        csum = np.concatenate(([0], np.cumsum(np.asarray(values)[self.order], dtype=np.int64)))
        return csum[self.offsets[1:]] - csum[self.offsets[:-1]]


def _validate(
    lengths, capacity: int, images, max_images: int | None
) -> tuple[np.ndarray, np.ndarray, int | None]:
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"item lengths must lie in 1..{capacity} (drop longer samples before packing)")
    if images is None or max_images is None:
        return lengths, np.zeros(n, dtype=np.int64), None
    images = np.asarray(images, dtype=np.int64)
    if n and images.max() > max_images:
        raise ValueError(f"an item has more than max_images={max_images} images")
    return lengths, images, max_images


class _Emitter:
    """Packs of one buffer, emitted as arrays in a seeded random order (10M items as lists take GBs)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.order: list[np.ndarray] = []
        self.sizes: list[np.ndarray] = []

    def emit(self, group: list[list[int]], ids: np.ndarray | None = None) -> None:
        """Packs of local indices, `ids` mapping them to item indices (None: the identity)."""
        shuffled = [group[i] for i in self.rng.permutation(len(group)).tolist()]
        self.sizes.append(np.fromiter(map(len, shuffled), dtype=np.int64, count=len(shuffled)))
        order = np.fromiter(chain.from_iterable(shuffled), dtype=np.int64)
        self.order.append(order if ids is None else ids[order])

    def packing(self, capacity: int, tokens: int) -> Packing:
        order = np.concatenate(self.order) if self.order else np.zeros(0, dtype=np.int64)
        sizes = np.concatenate(self.sizes) if self.sizes else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        return Packing(order, offsets, int(capacity), int(tokens))


class _OpenPacks:
    """Open packs keyed by remaining room: `rooms` is sorted, `by_room[r]` a stack of pack slots."""

    def __init__(self) -> None:
        self.items: list[list[int]] = []
        self.room: list[int] = []
        self.images: list[int] = []
        self.rooms: list[int] = []
        self.by_room: dict[int, list[int]] = {}

    def add(self, items: list[int], room: int, images: int) -> int:
        slot = len(self.items)
        self.items.append(items)
        self.room.append(room)
        self.images.append(images)
        self.file(slot)
        return slot

    def file(self, slot: int) -> None:
        r = self.room[slot]
        stack = self.by_room.get(r)
        if stack is None:
            self.by_room[r] = [slot]
            insort(self.rooms, r)
        else:
            stack.append(slot)

    def take(self, length: int, n_images: int, max_images: int | None) -> int:
        """Remove and return the best-fitting open pack for an item, or -1 when none fits."""
        k = bisect_left(self.rooms, length)
        rooms = self.rooms
        while k < len(rooms):
            r = rooms[k]
            stack = self.by_room[r]
            pos = len(stack) - 1
            if max_images is not None:
                while pos >= 0 and self.images[stack[pos]] + n_images > max_images:
                    pos -= 1
            if pos >= 0:
                slot = stack.pop(pos)
                if not stack:
                    del self.by_room[r]
                    del rooms[k]
                return slot
            k += 1
        return -1


def best_fit_decreasing(
    lengths: np.ndarray,
    capacity: int,
    *,
    images: np.ndarray | None = None,
    max_images: int | None = None,
    buffer_size: int = DEFAULT_BUFFER,
    seed: int = 0,
) -> Packing:
    """Plain best-fit decreasing per buffer (the baseline `pack_lengths` improves on): pack items of the
    given true lengths (each 1..capacity) into packs of at most `capacity` tokens and at most `max_images`
    images. In each buffer of the seeded shuffle, items go longest first into the open pack with the
    least room that still fits them (and stays under the image cap), found in O(log C) by bisecting the
    sorted distinct rooms; packs still open at the end of a buffer get one more buffer to fill up, then
    close. Deterministic for a given seed."""
    lengths, images, max_images = _validate(lengths, capacity, images, max_images)
    n = len(lengths)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    min_len = int(lengths.min()) if n else 1
    out = _Emitter(rng)
    carried: list[tuple[list[int], int, int]] = []  # packs given one more buffer to fill up
    for start in range(0, n, buffer_size):
        window = perm[start : start + buffer_size]
        window = window[np.argsort(-lengths[window], kind="stable")]
        packs = _OpenPacks()
        for items, room, imgs in carried:
            packs.add(items, room, imgs)
        n_carried = len(carried)
        closed: list[list[int]] = []
        for item, length, n_img in zip(
            window.tolist(), lengths[window].tolist(), images[window].tolist(), strict=True
        ):
            slot = packs.take(length, n_img, max_images)
            if slot < 0:
                slot = len(packs.items)
                packs.items.append([item])
                packs.room.append(capacity - length)
                packs.images.append(n_img)
            else:
                packs.items[slot].append(item)
                packs.room[slot] -= length
                packs.images[slot] += n_img
            if packs.room[slot] < min_len:
                closed.append(packs.items[slot])  # nothing can fit any more
            else:
                packs.file(slot)
        carried = []
        for r in packs.rooms:
            for slot in packs.by_room[r]:
                if slot < n_carried:
                    closed.append(packs.items[slot])
                else:
                    carried.append((packs.items[slot], packs.room[slot], packs.images[slot]))
        carried.sort(key=lambda c: c[0][0])  # independent of the room structure's iteration order
        out.emit(closed)
    if carried:
        out.emit([c[0] for c in carried])
    return out.packing(capacity, int(lengths.sum()))


# --- prices: duals of the configuration LP ------------------------------------------------------------


def _knapsack(w: np.ndarray, ub: np.ndarray, y: np.ndarray, cells: int, n_cols: int) -> tuple[float, list]:
    """max y.a s.t. w.a <= cells, 0 <= a <= ub, a integer (exact DP over the cells, each class split in
    0/1 pieces of 1, 2, 4, ... copies). Returns the max and up to n_cols patterns of value > 1 + 1e-9,
    the best ones ending at different cells."""
    pieces = []
    for i in np.flatnonzero(y > 0).tolist():
        left, k = int(ub[i]), 1
        while left > 0:
            take = min(k, left)
            if take * int(w[i]) <= cells:
                pieces.append((i, take))
            left -= take
            k *= 2
    best = np.zeros(cells + 1)
    taken = np.zeros((len(pieces), cells + 1), dtype=bool)
    for j, (i, k) in enumerate(pieces):
        wt = k * int(w[i])
        cand = best[: cells + 1 - wt] + k * y[i]
        better = cand > best[wt:] + 1e-12
        taken[j, wt:] = better
        best[wt:] = np.where(better, cand, best[wt:])
    patterns: list[np.ndarray] = []
    seen: set[bytes] = set()
    for c0 in np.argsort(-best, kind="stable")[: 8 * n_cols].tolist():
        if best[c0] <= 1 + 1e-9 or len(patterns) >= n_cols:
            break
        a = np.zeros(len(w))
        c = c0
        for j in range(len(pieces) - 1, -1, -1):
            if taken[j, c]:
                i, k = pieces[j]
                a[i] += k
                c -= k * int(w[i])
        key = a.tobytes()
        if key not in seen:
            seen.add(key)
            patterns.append(a)
    return float(best.max()), patterns


def _lp_duals(
    w: np.ndarray, d: np.ndarray, cells: int, max_pivots: int = 20000, max_rounds: int = 400
) -> np.ndarray | None:
    """Optimal duals y of  min sum x_p  s.t.  sum_p a_p x_p >= d, x >= 0  over all patterns a (w.a <= cells),
    by column generation: a dense revised simplex (explicit basis inverse, refactored every 100 pivots) on
    the patterns found so far, priced by `_knapsack`. Zero-cost exchange columns e_i - e_{i+1} (an item
    of class i may take the slot of a longer one) keep y monotone and spare degenerate pivots. Stops when
    no pattern prices out or the Farley bound d.y / max_a y.a is within _LP_GAP of the master, returning
    y / max_a y.a (dual feasible). Returns None when the LP has no waste (a fractional packing comes
    within 0.1 % of the volume w.d / cells: any full packing is optimal, and value = length is the right
    price) or when the pivot or round limits are hit first (deterministic limits, not time)."""
    m = len(w)
    volume = float(d @ w) / cells
    ub = np.minimum(np.maximum(1, np.ceil(d - 1e-9)), cells // w).astype(np.int64)
    cols = np.zeros((m, 4 * m))
    cols[np.arange(m), np.arange(m)] = ub
    n_cols = m
    # basis entries: j >= 0 a pattern column, -1 - i the surplus of row i, -1 - m - i exchange i -> i + 1
    basis = np.arange(m)
    b_inv = np.diag(1.0 / ub)
    x_b = d / ub
    c_b = np.ones(m)

    def column(q: int) -> np.ndarray:
        if q >= 0:
            return cols[:, q]
        v = np.zeros(m)
        if q >= -m:
            v[-1 - q] = -1.0
        else:
            v[-1 - m - q] = 1.0
            v[-m - q] = -1.0
        return v

    basic = np.zeros(cols.shape[1], dtype=bool)
    basic[:m] = True
    basic_s = np.zeros(m, dtype=bool)
    basic_e = np.zeros(max(0, m - 1), dtype=bool)

    def mark(q: int, on: bool) -> None:
        if q >= 0:
            basic[q] = on
        elif q >= -m:
            basic_s[-1 - q] = on
        else:
            basic_e[-1 - m - q] = on

    pivots = rounds = 0
    while pivots < max_pivots:
        y = c_b @ b_inv
        rc = np.where(basic[:n_cols], np.inf, 1.0 - y @ cols[:, :n_cols])
        rc_s = np.where(basic_s, np.inf, y)  # surplus column -e_i: reduced cost y_i
        rc_e = np.where(basic_e, np.inf, y[1:] - y[:-1])  # exchange e_i - e_{i+1}: y_{i+1} - y_i
        best = min(rc.min(), rc_s.min(), rc_e.min() if m > 1 else np.inf)
        if best > -1e-9:  # optimal on the columns so far: price all patterns
            rounds += 1
            obj = float(c_b @ x_b)
            if obj <= volume * 1.001 or rounds > max_rounds:
                return None
            y = np.maximum(y, 0.0)
            value, new = _knapsack(w, ub, y, cells, 10)
            if not new or float(d @ y) / value >= obj * (1 - _LP_GAP):
                return y / max(value, 1.0)  # dual feasible, and within _LP_GAP of the LP optimum
            if n_cols + len(new) > cols.shape[1]:
                cols = np.hstack([cols, np.zeros((m, cols.shape[1]))])
                basic = np.concatenate([basic, np.zeros(len(basic), dtype=bool)])
            for a in new:
                cols[:, n_cols] = a
                n_cols += 1
            continue
        # entering column: the first (lowest index) within 1e-12 of the most negative reduced cost
        limit = best + 1e-12
        if rc.min() <= limit:
            q = int(np.flatnonzero(rc <= limit)[0])
        elif rc_s.min() <= limit:
            q = -1 - int(np.flatnonzero(rc_s <= limit)[0])
        else:
            q = -1 - m - int(np.flatnonzero(rc_e <= limit)[0])
        u = b_inv @ column(q)
        pos = np.flatnonzero(u > 1e-9)
        if not len(pos):
            return None  # cannot happen (the objective is bounded below by 0): give up on prices
        ratios = x_b[pos] / u[pos]
        tie = pos[ratios <= ratios.min() + 1e-12]
        r = int(tie[np.argmax(u[tie])])  # among tied rows, the largest pivot
        theta = x_b[r] / u[r]
        x_b = np.maximum(x_b - theta * u, 0.0)
        x_b[r] = theta
        row = b_inv[r] / u[r]
        b_inv -= np.outer(u, row)
        b_inv[r] = row
        mark(int(basis[r]), False)
        mark(q, True)
        basis[r] = q
        c_b[r] = 1.0 if q >= 0 else 0.0
        pivots += 1
        if float(c_b @ x_b) <= volume * 1.001:
            return None  # a fractional packing within 0.1 % of the volume: the LP has no waste
        if pivots % 100 == 0:
            try:
                b_inv = np.linalg.inv(np.column_stack([column(int(j)) for j in basis]))
            except np.linalg.LinAlgError:
                return None
            x_b = np.maximum(b_inv @ d, 0.0)
    return None


def item_values(lengths: np.ndarray, capacity: int, buffer_size: int = DEFAULT_BUFFER) -> np.ndarray:
    """Integer value of an item of each length 0..capacity: K * Y(l) + l, where Y(l) is the configuration
    LP's optimal dual for the length's class in units of 2^-20 (0 when the LP has no waste, so that value
    is length) and K = 2 * capacity + 2 makes length only break ties between equal duals."""
    lengths = np.asarray(lengths, dtype=np.int64)
    cap = int(capacity)
    ln = np.arange(cap + 1, dtype=np.int64)
    if not len(lengths):
        return ln
    g = max(1, cap // _PRICE_CLASSES)
    hist = np.bincount(lengths // g, minlength=cap // g + 1)
    cls = np.flatnonzero(hist[1:]) + 1  # class 0 (shorter than g) is free: it fits anywhere
    if not len(cls):
        return ln
    d = hist[cls] * (min(buffer_size, len(lengths)) / len(lengths))
    y = _lp_duals(cls.astype(np.int64), d, cap // g)
    if y is None:
        return ln
    per_class = np.zeros(cap // g + 1)
    per_class[cls] = y
    per_class = np.maximum.accumulate(per_class)  # monotone (the exchange columns make it so already)
    units = np.rint(np.minimum(per_class, 1.0) * _PRICE_SCALE).astype(np.int64)
    return units[ln // g] * (2 * cap + 2) + ln


# --- one buffer: packs built one at a time ---------------------------------------------------------------


class _Start:
    """What every pass over a buffer starts from: items sorted by length, the counts, and the number of
    pairs of distinct items summing to each length (one FFT), copied by each pass."""

    def __init__(self, lens: np.ndarray, imgs: np.ndarray, capacity: int) -> None:
        cap = capacity
        self.lens, self.imgs, self.capacity = lens, imgs, cap
        self.cnt = np.bincount(lens, minlength=cap + 1).astype(np.int64)
        self.inv = np.zeros(cap + 1)
        has = self.cnt > 0
        self.inv[has] = 1.0 / self.cnt[has]
        av = has.astype(np.int64)
        size = 1 << (2 * cap + 1).bit_length()
        f = np.fft.rfft(av.astype(np.float64), size)
        conv = np.rint(np.fft.irfft(f * f, size)[: cap + 1]).astype(np.int64)  # ordered, (a, a) once
        ln = np.arange(cap // 2 + 1)
        conv[2 * ln] -= av[ln]
        conv //= 2
        conv[2 * ln] += self.cnt[ln] >= 2
        self.pairs = conv
        self.av = av
        self.pred = np.maximum.accumulate(np.where(has, np.arange(cap + 1), 0))
        self.distinct = np.flatnonzero(has).tolist()


class _Pool:
    """The items of a buffer not packed yet. `cnt[l]` items of length l are left, in `buckets[l]` (the
    next to go last); `pairs[s]` is the number of pairs of them (distinct items) of lengths summing to s;
    `pred[x]` the longest length left <= x (0: none); `left` the sorted distinct lengths left."""

    def __init__(self, start: _Start, first: np.ndarray, values: np.ndarray, max_images: int | None):
        cap = start.capacity
        self.capacity = cap
        self.values = values
        self.max_images = max_images
        self.imgs = start.imgs.tolist() if max_images is not None else None
        self.cnt = start.cnt.copy()
        self.inv = start.inv
        self.counts = start.cnt.tolist()
        self.av = start.av.copy()
        self.pairs = start.pairs.copy()
        self.reach = start.pairs + start.av  # > 0: a sum that one or two items left make exactly
        self.pred = start.pred.copy()
        self.left = list(start.distinct)
        self.arr: np.ndarray | None = None
        # within a length, items to pack first (`first`) go last in the bucket, i.e. are popped first
        order = np.lexsort((first, start.lens))
        lens_sorted = start.lens[order]
        cuts = np.flatnonzero(np.diff(lens_sorted)) + 1
        self.buckets: list = [None] * (cap + 1)
        for ln, group in zip(
            lens_sorted[np.concatenate(([0], cuts))].tolist(), np.split(order, cuts), strict=True
        ):
            if max_images is None:
                self.buckets[ln] = group.tolist()
            else:  # by image count: bucket[k] holds the items of this length with k images
                by_images: list[list[int]] = [[] for _ in range(max_images + 1)]
                for item, k in zip(group.tolist(), start.imgs[group].tolist(), strict=True):
                    by_images[k].append(item)
                self.buckets[ln] = by_images

    def lengths(self) -> np.ndarray:
        if self.arr is None:
            self.arr = np.array(self.left, dtype=np.int64)
        return self.arr

    def take(self, ln: int, room_images: int = 0) -> int:
        """Remove and return an item of length ln (under the cap: the one with the most images that fit
        in room_images), or -1 when none fits the image room."""
        bucket = self.buckets[ln]
        if self.imgs is None:
            item = bucket.pop()
        else:
            k = min(room_images, self.max_images)
            while k >= 0 and not bucket[k]:
                k -= 1
            if k < 0:
                return -1
            item = bucket[k].pop()
        c = self.counts[ln] - 1
        self.counts[ln] = c
        self.cnt[ln] = c
        if c == 1:
            if 2 * ln <= self.capacity:
                self.pairs[2 * ln] -= 1
                self.reach[2 * ln] -= 1
        elif c == 0:
            cap = self.capacity
            av = self.av
            av[ln] = 0
            self.reach[ln] -= 1
            self.pairs[ln:] -= av[: cap + 1 - ln]
            self.reach[ln:] -= av[: cap + 1 - ln]
            left = self.left
            k = bisect_left(left, ln)
            del left[k]
            self.pred[ln : left[k] if k < len(left) else cap + 1] = self.pred[ln - 1]
            self.arr = None
        return item

    def best_pair(self, room: int) -> tuple[int, int, int]:
        """The one or two items (a >= b, b = 0: none) of the largest total value within room; among equal
        values, the one whose scarcer length has the largest share of its items left. -> (value, a, b)"""
        arr = self.lengths()
        i0 = int(arr.searchsorted(room >> 1, "right"))
        a = arr[i0 - 1 if i0 else 0 : int(arr.searchsorted(room, "right"))]
        b = self.pred[room - a]  # the longest partner of each a > room / 2 ...
        if i0:  # ... and for the longest a <= room / 2, another a or the longest shorter one
            a0 = int(a[0])
            b[0] = a0 if 2 * a0 <= room and self.counts[a0] >= 2 else self.pred[a0 - 1]
        values = self.values
        tot = values[a]
        tot += values[b]  # values[0] == 0: no second item
        top = tot.max()
        tied = (tot == top).nonzero()[0]
        j = int(tied[0])
        if len(tied) > 1:
            at, bt = a[tied], b[tied]
            cnt, inv = self.cnt, self.inv
            share = np.minimum(cnt[at] * inv[at], np.where(bt > 0, (cnt[bt] - (bt == at)) * inv[bt], 2.0))
            j = int(tied[int(share.argmax())])
        return int(top), int(a[j]), int(b[j])

    def exact_third(self, room: int) -> int:
        """An item a after which one or two others fill the room exactly (judged on the counts before a
        is taken), the one with the largest share of its length left; 0 when there is none."""
        arr = self.lengths()
        k = int(arr.searchsorted(room - 1, "right"))
        a = arr[:k]
        ok = self.reach[room - a] > 0
        half = room >> 1
        if not room & 1 and self.counts[half] == 1 and self.pairs[half] == 0:
            ok[int(arr.searchsorted(half))] = False  # its only completion was itself
        hits = ok.nonzero()[0]
        if not len(hits):
            return 0
        ah = a[hits]
        share = self.cnt[ah] * self.inv[ah]
        return int(ah[len(ah) - 1 - int(share[::-1].argmax())])  # ties: the longest

    def build(self, first_len: int, proportional: bool) -> tuple[list[int], list[int]]:
        """One pack opened by an item of length first_len: its items and their lengths."""
        cap = self.capacity
        capped = self.imgs is not None
        room_img = 0
        item = self.take(first_len, self.max_images or 0)
        items, lens = [item], [first_len]
        if capped:
            room_img = self.max_images - self.imgs[item]
        room = cap - first_len
        values, counts, left, pred = self.values, self.counts, self.left, self.pred
        pairs = self.pairs
        while left and room >= left[0]:
            if proportional:  # value is length: an exact fill (one, two, then three items) is best
                if counts[room] > 0:
                    picks: tuple[int, ...] = (room,)
                elif pairs[room] > 0:
                    _, a, b = self.best_pair(room)
                    picks = (a, b)
                else:
                    c = self.exact_third(room)
                    longest = int(pred[room])
                    if c:
                        picks = (c,)
                    elif room > 2 * longest:
                        picks = (longest,)
                    else:
                        _, a, b = self.best_pair(room)
                        picks = (a, b) if b else (a,)
            else:
                top, a, b = self.best_pair(room)
                picks = (a, b) if b else (a,)
                if a + b < room:
                    longest = int(pred[room])
                    c = self.exact_third(room)
                    if c and (room > 2 * longest or values[c] + self.best_pair(room - c)[0] > top):
                        picks = (c,)
                    elif not c and room > 2 * longest:
                        picks = (longest,)
            for ln in picks:
                item = self.take(ln, room_img)
                if item < 0:  # the image cap: fill the rest with whatever fits, longest first
                    return self._fill_capped(items, lens, room, room_img)
                items.append(item)
                lens.append(ln)
                room -= ln
                if capped:
                    room_img -= self.imgs[item]
        return items, lens

    def _fill_capped(self, items: list[int], lens: list[int], room: int, room_img: int):
        for ln in reversed(list(self.left)):
            while ln <= room and self.counts[ln] > 0:
                item = self.take(ln, room_img)
                if item < 0:
                    break
                items.append(item)
                lens.append(ln)
                room -= ln
                room_img -= self.imgs[item]
        return items, lens


def _pass(
    start: _Start, first: np.ndarray, values: np.ndarray, max_images: int | None, proportional: bool
) -> tuple[list[list[int]], np.ndarray]:
    """Pack a buffer once: items marked `first` open packs first (longest first), then the longest left.
    Returns the packs (local indices) and the tokens of each."""
    pool = _Pool(start, first, values, max_images)
    marked = np.flatnonzero(first)
    openers = start.lens[marked[np.lexsort((-start.lens[marked], -first[marked]))]].tolist()
    reuse = max_images is None and _REUSE > 0
    patterns: dict[int, list] = {}  # first length -> [lengths, their (length, count) pairs, uses]
    packs: list[list[int]] = []
    tokens: list[int] = []
    counts, left, take = pool.counts, pool.left, pool.take
    k = 0
    while left:
        while k < len(openers) and counts[openers[k]] == 0:
            k += 1
        if k < len(openers):
            f = openers[k]
            k += 1
        else:
            f = left[-1]
        if reuse:
            pattern = patterns.get(f)
            if pattern is not None and pattern[2] < _REUSE and all(counts[ln] >= c for ln, c in pattern[1]):
                lens = pattern[0]
                packs.append([take(ln) for ln in lens])
                tokens.append(sum(lens))
                pattern[2] += 1
                continue
        items, lens = pool.build(f, proportional)
        packs.append(items)
        tokens.append(sum(lens))
        if reuse:
            need: dict[int, int] = {}
            for ln in lens:
                need[ln] = need.get(ln, 0) + 1
            patterns[f] = [lens, list(need.items()), 0]
    return packs, np.array(tokens, dtype=np.int64)


def _poor(
    packs: list[list[int]],
    tokens: np.ndarray,
    lens: np.ndarray,
    units: np.ndarray,
    capacity: int,
    proportional: bool,
) -> np.ndarray:
    """Which packs are poor: more than _POOR_FILL empty and, when value is the dual, short of a full
    pack's value by more than _POOR_VALUE (a full pack is never poor)."""
    if proportional:
        return tokens < (1 - _POOR_FILL) * capacity
    sizes = np.fromiter(map(len, packs), dtype=np.int64, count=len(packs))
    flat = np.fromiter(chain.from_iterable(packs), dtype=np.int64, count=int(sizes.sum()))
    value = np.add.reduceat(units[lens[flat]], np.concatenate(([0], np.cumsum(sizes)[:-1])))
    return (value < (1 - _POOR_VALUE) * _PRICE_SCALE) & (tokens < (1 - _POOR_FILL) * capacity)


def _pack_buffer(
    lens: np.ndarray,
    imgs: np.ndarray,
    capacity: int,
    values: np.ndarray,
    max_images: int | None,
    n_first: int,
    passes: int,
) -> tuple[list[list[int]], np.ndarray]:
    """The best of `passes` passes over one buffer (fewest packs; the first pass on a tie), and which of
    its packs are poor. The first n_first items (carried) open packs first in every pass; each pass adds
    the items of the previous pass's poor packs to those."""
    units = values // (2 * capacity + 2)
    proportional = not units.any()
    start = _Start(lens, imgs, capacity)
    first = np.zeros(len(lens), dtype=np.int64)
    first[:n_first] = 1
    best: tuple[list[list[int]], np.ndarray] | None = None
    for p in range(max(1, passes)):
        packs, tokens = _pass(start, first, values, max_images, proportional)
        poor = _poor(packs, tokens, lens, units, capacity, proportional)
        if best is None or len(packs) < len(best[0]):
            best = (packs, poor)
        if p + 1 == passes or not poor.any():
            break
        poor_packs = (pk for pk, bad in zip(packs, poor.tolist(), strict=True) if bad)
        idx = list(chain.from_iterable(poor_packs))
        first[idx] += 1
    assert best is not None
    return best


def pack_lengths(
    lengths: np.ndarray,
    capacity: int,
    *,
    images: np.ndarray | None = None,
    max_images: int | None = None,
    buffer_size: int = DEFAULT_BUFFER,
    seed: int = 0,
    passes: int = DEFAULT_PASSES,
) -> Packing:
    """Pack items of the given true lengths (each 1..capacity) into packs of at most `capacity` tokens
    and at most `max_images` images, near the fewest packs possible (see the module doc). Every item
    lands in exactly one pack; a pack holds items of one buffer of the seeded shuffle, or of one buffer
    and the poor packs carried from the one before. `passes` (packings of each buffer, the best kept)
    trades time for fill: about 10 us per item on one core at 3, a third less at 2 (a few more packs on
    small inputs, the same on large ones). Deterministic for a given seed."""
    lengths, images, max_images = _validate(lengths, capacity, images, max_images)
    n = len(lengths)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    if max_images is not None:
        has = images > 0
        if not has.any() or int(((capacity * images[has]) // lengths[has]).max()) <= max_images:
            max_images = None  # no pack can exceed the cap: at most capacity * max(images / length) images
    values = item_values(lengths, capacity, buffer_size)
    out = _Emitter(rng)
    carried = np.zeros(0, dtype=np.int64)
    for start in range(0, n, buffer_size):
        items = np.concatenate((carried, perm[start : start + buffer_size]))
        last = start + buffer_size >= n
        packs, poor = _pack_buffer(
            lengths[items],
            images[items],
            capacity,
            values,
            max_images,
            len(carried),
            passes * (1 + last * _LAST),
        )
        budget = 0 if last else int(buffer_size * _CARRY)
        keep: list[list[int]] = []
        carry: list[int] = []
        for pack, bad in zip(packs, poor.tolist(), strict=True):
            if bad and len(carry) + len(pack) <= budget and min(pack) >= len(carried):
                carry.extend(pack)
            else:
                keep.append(pack)
        out.emit(keep, items)
        carried = items[np.array(carry, dtype=np.int64)]
    return out.packing(capacity, int(lengths.sum()))
