"""Best-fit-decreasing packing of samples (by true length) into sequences of a fixed capacity.

Works on arrays only (lengths, image counts), so 10M samples cost a few arrays and a Python loop of a
few operations each. The samples are shuffled with a seed, then taken a buffer at a time: in each buffer
they go longest first into the open pack with the least room that still fits them (and stays under the
image cap). Open packs are found in O(log C) by bisecting the sorted list of distinct remaining rooms,
each with its stack of packs. Packs still open at the end of a buffer get one more buffer to fill up,
then close; the packs closed in a buffer are emitted in a seeded random order.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from itertools import chain

import numpy as np

DEFAULT_BUFFER = 65536


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
    """Pack items of the given true lengths (each 1..capacity) into packs of at most `capacity` tokens
    and at most `max_images` images. Deterministic for a given seed."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"item lengths must lie in 1..{capacity} (drop longer samples before packing)")
    if images is None or max_images is None:
        images = np.zeros(n, dtype=np.int64)
        max_images = None
    else:
        images = np.asarray(images, dtype=np.int64)
        if n and images.max() > max_images:
            raise ValueError(f"an item has more than max_images={max_images} images")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    min_len = int(lengths.min()) if n else 1
    out_order: list[np.ndarray] = []
    out_sizes: list[np.ndarray] = []

    def emit(group: list[list[int]]) -> None:  # as arrays at once: 10M items as lists would take GBs
        shuffled = [group[i] for i in rng.permutation(len(group)).tolist()]
        out_sizes.append(np.fromiter(map(len, shuffled), dtype=np.int64, count=len(shuffled)))
        out_order.append(np.fromiter(chain.from_iterable(shuffled), dtype=np.int64))

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
        emit(closed)
    if carried:
        emit([c[0] for c in carried])
    order = np.concatenate(out_order) if out_order else np.zeros(0, dtype=np.int64)
    sizes = np.concatenate(out_sizes) if out_sizes else np.zeros(0, dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    return Packing(order, offsets, int(capacity), int(lengths.sum()))
