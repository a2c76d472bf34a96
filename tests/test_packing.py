"""The packers: every item once, capacity and image cap held, seeded, dense; `pack_lengths` (what `pack`
uses) near the optimum where best-fit decreasing is not."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from ovis_data.pack.packing import best_fit_decreasing, item_values, pack_lengths

PACKERS = [best_fit_decreasing, pack_lengths]


def _mix(n: int, seed: int = 0, image_share: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """One-image samples (577 extra tokens) and text-only ones, log-normal text lengths."""
    rng = np.random.default_rng(seed)
    text = np.clip(rng.lognormal(4.8, 0.9, n).astype(np.int64), 8, 1400)
    images = (rng.random(n) < image_share).astype(np.int64)
    return np.minimum(text + 577 * images, 2048), images


def _perfect(n_packs: int, capacity: int, seed: int = 0) -> np.ndarray:
    """Items cut from n_packs full packs (4 to 6 items each, 0.6..1.4 times the average): n_packs packs
    is the optimum (no fewer can hold capacity * n_packs tokens), and the items are shuffled."""
    rng = np.random.default_rng(seed)
    packs = []
    while len(packs) < n_packs:
        k = int(rng.integers(4, 7))
        lo, hi = int(0.6 * capacity / k), int(1.4 * capacity / k)
        cut = rng.integers(lo, hi, k - 1)
        if lo <= capacity - cut.sum() < hi:
            packs.append(np.append(cut, capacity - cut.sum()))
    items = np.concatenate(packs)
    return items[rng.permutation(len(items))]


def _fewest_packs(lengths: list[int], capacity: int) -> int:
    """The optimum by exhaustive search (a few items only): each item, longest first, into every pack of
    a distinct load that fits it, or a new pack."""
    items = sorted(lengths, reverse=True)
    best = len(items)

    def place(i: int, loads: list[int]) -> None:
        nonlocal best
        if len(loads) >= best:
            return
        if i == len(items):
            best = len(loads)
            return
        for k, load in enumerate(loads):
            if load + items[i] <= capacity and load not in loads[:k]:
                loads[k] += items[i]
                place(i + 1, loads)
                loads[k] -= items[i]
        place(i + 1, [*loads, items[i]])

    place(0, [])
    return best


def _check(packing, lengths, images, capacity, max_images):
    assert np.array_equal(np.sort(packing.order), np.arange(len(lengths)))  # every item exactly once
    assert (packing.per_pack(lengths) <= capacity).all()
    assert (packing.per_pack(images) <= max_images).all()
    assert (np.diff(packing.offsets) >= 1).all()
    assert packing.tokens == lengths.sum()


@functools.cache
def _dense_mix(packer):  # noqa: ANN001, ANN202 - one of PACKERS -> (lengths, images, its Packing)
    """40,000 mixed items packed at 2048 in buffers of 8192, once per packer (tests only read it)."""
    lengths, images = _mix(40_000)
    return lengths, images, packer(lengths, 2048, images=images, max_images=32, buffer_size=8192, seed=3)


@pytest.mark.parametrize("packer", PACKERS)
def test_packs_every_item_once_within_capacity_and_dense(packer):
    lengths, images, p = _dense_mix(packer)
    _check(p, lengths, images, 2048, 32)
    assert p.n_packs <= np.ceil(lengths.sum() / 2048) * 1.005  # within 0.5% of the volume bound
    assert p.fill >= 0.99


@pytest.mark.parametrize("packer", PACKERS)
def test_image_cap_is_held_even_when_tokens_would_fit(packer):
    rng = np.random.default_rng(1)
    lengths = rng.integers(20, 80, 5000)
    images = rng.integers(0, 3, 5000)
    p = packer(lengths, 4096, images=images, max_images=4, buffer_size=1000, seed=0)
    _check(p, lengths, images, 4096, 4)
    assert p.per_pack(images).max() == 4
    assert p.n_packs <= np.ceil(images.sum() / 4) * 1.02  # the cap, not the tokens, sets the count


@pytest.mark.parametrize("packer", PACKERS)
def test_same_seed_same_packs_other_seed_other_packs(packer):
    lengths, images = _mix(5000, seed=2)
    a = packer(lengths, 2048, images=images, max_images=8, buffer_size=1000, seed=7)
    b = packer(lengths, 2048, images=images, max_images=8, buffer_size=1000, seed=7)
    c = packer(lengths, 2048, images=images, max_images=8, buffer_size=1000, seed=8)
    assert np.array_equal(a.order, b.order) and np.array_equal(a.offsets, b.offsets)
    assert not np.array_equal(a.order, c.order)


@pytest.mark.parametrize("packer", PACKERS)
def test_packs_mix_the_whole_stream_not_one_buffer_in_order(packer):
    # The first packs must not all come from the first items: the shuffle precedes the buffers.
    lengths = np.full(10_000, 100)
    p = packer(lengths, 1000, buffer_size=1000, seed=0)
    assert p.fill == 1.0 and p.n_packs == 1000
    assert p.pack(0).max() > 1000


@pytest.mark.parametrize("packer", PACKERS)
def test_edge_cases(packer):
    empty = packer(np.zeros(0, dtype=np.int64), 2048)
    assert empty.n_packs == 0 and empty.fill == 0.0
    one = packer(np.array([2048]), 2048)
    assert one.n_packs == 1 and one.fill == 1.0
    with pytest.raises(ValueError, match="1..2048"):
        packer(np.array([10, 2049]), 2048)
    with pytest.raises(ValueError, match="max_images"):
        packer(np.array([10]), 2048, images=np.array([3]), max_images=2)


def test_pack_lengths_finds_the_optimum_where_best_fit_decreasing_does_not():
    # Longest first, BFD puts 11 + 9 together, then 7 + 7 + 5, and 3 alone: 3 packs. Filling each pack
    # as well as possible gives 11 + 7 + 3 and 9 + 7 + 5, both exactly 21: 2 packs.
    lengths = np.array([11, 9, 7, 7, 5, 3])
    assert _fewest_packs(lengths.tolist(), 21) == 2
    assert best_fit_decreasing(lengths, 21).n_packs == 3
    p = pack_lengths(lengths, 21)
    _check(p, lengths, np.zeros(6, dtype=np.int64), 21, 0)
    assert p.n_packs == 2 and p.fill == 1.0


@pytest.mark.parametrize(("capacity", "buffer_size"), [(4096, 65536), (2048, 65536), (4096, 3000)])
def test_pack_lengths_is_near_the_optimum_on_a_perfectly_packable_mix(capacity, buffer_size):
    # 3000 full packs cut into 4..6 items: the optimum is exactly 3000. BFD leaves the middle of the
    # distribution for the end of each buffer, where it no longer fills packs (> 2 % more packs).
    lengths = _perfect(3000, capacity)
    bfd = best_fit_decreasing(lengths, capacity, buffer_size=buffer_size)
    ours = pack_lengths(lengths, capacity, buffer_size=buffer_size)
    _check(ours, lengths, np.zeros(len(lengths), dtype=np.int64), capacity, 0)
    assert bfd.n_packs > 3000 * 1.02
    assert ours.n_packs <= 3000 + 3


def test_pack_lengths_holds_only_items_of_one_buffer_and_the_one_before():
    # Poor packs of a buffer are carried into the next one (at most once), never further. The packing of
    # the test above (5 buffers of 8192), read again: its LP prices are ~90% of a pack_lengths call.
    lengths, _, p = _dense_mix(pack_lengths)
    position = np.empty(len(lengths), dtype=np.int64)
    position[np.random.default_rng(3).permutation(len(lengths))] = np.arange(len(lengths))
    buffer = position // 8192
    first = np.minimum.reduceat(buffer[p.order], p.offsets[:-1])
    last = np.maximum.reduceat(buffer[p.order], p.offsets[:-1])
    assert (last - first <= 1).all() and (last - first == 1).any()


def test_item_values_are_lp_duals_where_packs_must_waste_and_length_where_they_need_not():
    k = 2 * 2048 + 2
    # Items of 800: two per pack, 448 tokens empty; each is worth half a pack (dual 2^19 / 2^20).
    halves = item_values(np.full(1000, 800), 2048)
    assert halves[800] // k == 1 << 19 and halves[800] % k == 800
    # Items of 512 and 1024 fill packs exactly: value is length.
    exact = item_values(np.array([512] * 400 + [1024] * 100), 2048)
    assert np.array_equal(exact, np.arange(2049))
