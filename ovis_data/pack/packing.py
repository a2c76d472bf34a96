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
Step 1 is in `lp.py`, steps 2 and 3 in `completion.py`; this module drives them per buffer.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from itertools import chain

import numpy as np

from .completion import pack_buffer
from .lp import PRICE_SCALE, lp_duals

DEFAULT_BUFFER = 65536
DEFAULT_PASSES = 3
_PRICE_CLASSES = 256  # LP classes: lengths rounded down to multiples of capacity // 256
_CARRY = 0.25  # at most this share of a buffer is carried into the next
_LAST = 1  # the last buffer, which cannot carry its poor packs on, gets (1 + _LAST) x the passes


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


# The LP's duals depend only on the length histogram: one process packing the same stage again (the
# demo, a re-run, the tests) or many shards with one histogram prices it once. Bounded, since each entry
# holds one dual per length class.
_DUALS_CACHE: dict[bytes, np.ndarray | None] = {}
_DUALS_CACHE_SIZE = 64


def _class_duals(cls: np.ndarray, d: np.ndarray, cells: int) -> np.ndarray | None:
    key = cls.tobytes() + d.tobytes() + cells.to_bytes(8, "little")
    if key not in _DUALS_CACHE:
        if len(_DUALS_CACHE) >= _DUALS_CACHE_SIZE:
            _DUALS_CACHE.pop(next(iter(_DUALS_CACHE)))
        _DUALS_CACHE[key] = lp_duals(cls, d, cells)
    y = _DUALS_CACHE[key]
    return None if y is None else y.copy()


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
    y = _class_duals(cls.astype(np.int64), d, cap // g)
    if y is None:
        return ln
    per_class = np.zeros(cap // g + 1)
    per_class[cls] = y
    per_class = np.maximum.accumulate(per_class)  # monotone (the exchange columns make it so already)
    units = np.rint(np.minimum(per_class, 1.0) * PRICE_SCALE).astype(np.int64)
    return units[ln // g] * (2 * cap + 2) + ln


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
        packs, poor = pack_buffer(
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
