"""The best-fit-decreasing packer: every item once, capacity and image cap held, seeded, dense."""

from __future__ import annotations

import numpy as np
import pytest

from ovis_data.packing import best_fit_decreasing


def _mix(n: int, seed: int = 0, image_share: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """One-image samples (577 extra tokens) and text-only ones, log-normal text lengths."""
    rng = np.random.default_rng(seed)
    text = np.clip(rng.lognormal(4.8, 0.9, n).astype(np.int64), 8, 1400)
    images = (rng.random(n) < image_share).astype(np.int64)
    return np.minimum(text + 577 * images, 2048), images


def _check(packing, lengths, images, capacity, max_images):
    assert np.array_equal(np.sort(packing.order), np.arange(len(lengths)))  # every item exactly once
    assert (packing.per_pack(lengths) <= capacity).all()
    assert (packing.per_pack(images) <= max_images).all()
    assert (np.diff(packing.offsets) >= 1).all()
    assert packing.tokens == lengths.sum()


def test_packs_every_item_once_within_capacity_and_dense():
    lengths, images = _mix(40_000)
    p = best_fit_decreasing(lengths, 2048, images=images, max_images=32, buffer_size=8192, seed=3)
    _check(p, lengths, images, 2048, 32)
    assert p.n_packs <= np.ceil(lengths.sum() / 2048) * 1.005  # within 0.5% of the volume bound
    assert p.fill >= 0.99


def test_image_cap_is_held_even_when_tokens_would_fit():
    rng = np.random.default_rng(1)
    lengths = rng.integers(20, 80, 5000)
    images = rng.integers(0, 3, 5000)
    p = best_fit_decreasing(lengths, 4096, images=images, max_images=4, buffer_size=1000, seed=0)
    _check(p, lengths, images, 4096, 4)
    assert p.per_pack(images).max() == 4


def test_same_seed_same_packs_other_seed_other_packs():
    lengths, images = _mix(5000, seed=2)
    a = best_fit_decreasing(lengths, 2048, images=images, max_images=8, buffer_size=1000, seed=7)
    b = best_fit_decreasing(lengths, 2048, images=images, max_images=8, buffer_size=1000, seed=7)
    c = best_fit_decreasing(lengths, 2048, images=images, max_images=8, buffer_size=1000, seed=8)
    assert np.array_equal(a.order, b.order) and np.array_equal(a.offsets, b.offsets)
    assert not np.array_equal(a.order, c.order)


def test_packs_mix_the_whole_stream_not_one_buffer_in_order():
    # The first packs must not all come from the first items: the shuffle precedes the buffers.
    lengths = np.full(10_000, 100)
    p = best_fit_decreasing(lengths, 1000, buffer_size=1000, seed=0)
    assert p.fill == 1.0 and p.n_packs == 1000
    assert p.pack(0).max() > 1000


def test_edge_cases():
    empty = best_fit_decreasing(np.zeros(0, dtype=np.int64), 2048)
    assert empty.n_packs == 0 and empty.fill == 0.0
    one = best_fit_decreasing(np.array([2048]), 2048)
    assert one.n_packs == 1 and one.fill == 1.0
    with pytest.raises(ValueError, match="1..2048"):
        best_fit_decreasing(np.array([10, 2049]), 2048)
    with pytest.raises(ValueError, match="max_images"):
        best_fit_decreasing(np.array([10]), 2048, images=np.array([3]), max_images=2)
