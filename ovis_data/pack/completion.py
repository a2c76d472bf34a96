"""Bin completion for `packing.pack_lengths`: one buffer packed one pack at a time, in repeated passes,
the items of a pass's poor packs opening packs first in the next (steps 2 and 3 of the algorithm described
in `packing`'s module doc)."""

from __future__ import annotations

from bisect import bisect_left
from itertools import chain

import numpy as np

from .lp import PRICE_SCALE

_POOR_FILL = 0.01  # a pack more than 1 % empty ...
_POOR_VALUE = 0.05  # ... and (when value is the dual) short of 1 by more than 5 % is poor: lengths sit
# up to capacity/256 above their LP class, so an LP-optimal pack of real items may fall a little short
_REUSE = 1  # times a pack pattern found for an opening length is repeated before searching again


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
    return (value < (1 - _POOR_VALUE) * PRICE_SCALE) & (tokens < (1 - _POOR_FILL) * capacity)


def pack_buffer(
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
