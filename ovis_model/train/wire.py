"""Handing micro-batches from loader workers to the training process through memory shared once.

torch's DataLoader sends every tensor a worker yields as a fresh shared-memory segment: the worker creates
it, faults its pages in and fills it; the main process takes its file descriptor over a socket handshake
(one per tensor) and maps it. For a micro-batch of image canvases (5-10 MB) that cost the worker ~5 ms on
this project's benchmark machine, about what decoding a third of the batch's images costs.

`SlotRing` is set up by the main process before the workers start: per worker, `slots` buffers of
`nbytes` in one shared segment (sent to each worker once, with the dataset), and a busy flag per buffer. A
worker copies a micro-batch's tensors into its next free buffer, marks it busy and yields only the layout
(a few hundred bytes through the pipe); the main process copies the buffer out (into pinned memory when
pinning) and marks it free. A worker waits for its next buffer only while the main process has not yet
taken the micro-batch that used it; the main process takes micro-batches in plan order, and a worker fills
its buffers in that order too, so the worker the main process waits for never waits: no deadlock, for any
number of slots. A micro-batch larger than a buffer (e.g. `layout="rows"` padding) goes over one fresh
segment per micro-batch (`to_shared`), still one handshake, not one per tensor.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

SLOT = "__slot__"  # key of a micro-batch left in a SlotRing buffer
SHARED = "__shared__"  # key of a micro-batch packed into one fresh shared buffer
_ALIGN = 64

Layout = list[tuple[str, torch.dtype, tuple[int, ...], int]]


def _layout(inputs: dict[str, Any]) -> tuple[Layout, int]:
    """Where each tensor of `inputs` goes in one byte buffer (aligned for any dtype), and its size."""
    layout, size = [], 0
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            size = -(-size // _ALIGN) * _ALIGN
            layout.append((key, value.dtype, tuple(value.shape), size))
            size += value.numel() * value.element_size()
    return layout, size


def _views(buffer: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    out = {}
    for key, dtype, shape, offset in layout:
        n = math.prod(shape) * dtype.itemsize
        out[key] = buffer[offset : offset + n].view(dtype).view(shape)
    return out


def _fill(buffer: torch.Tensor, inputs: dict[str, Any], layout: Layout) -> None:
    for key, tensor in _views(buffer, layout).items():
        tensor.copy_(inputs[key])


def _rest(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}


def to_shared(inputs: dict[str, Any]) -> dict[str, Any]:
    """All tensors of a micro-batch in one fresh shared-memory buffer, with their layout."""
    layout, size = _layout(inputs)
    buffer = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(size, 1)))
    _fill(buffer, inputs, layout)
    return {SHARED: (buffer, layout), **_rest(inputs)}


class SlotRing:
    """Per-worker shared buffers, reused micro-batch after micro-batch (see the module doc)."""

    def __init__(self, workers: int, slots: int, nbytes: int) -> None:
        self.workers, self.slots, self.nbytes = int(workers), int(slots), -(-int(nbytes) // _ALIGN) * _ALIGN
        storage = torch.UntypedStorage._new_shared(self.workers * self.slots * self.nbytes)
        self.buffers = torch.empty(0, dtype=torch.uint8).set_(storage).view(self.workers, self.slots, -1)
        self.busy = torch.zeros((self.workers, self.slots), dtype=torch.int32).share_memory_()
        self._next = 0  # the next slot of the worker holding this copy (each worker has its own)

    # -- worker side ---------------------------------------------------------------------------------------
    def put(self, worker: int, inputs: dict[str, Any]) -> dict[str, Any]:
        """The message to yield for `inputs`: a slot reference, or `to_shared` when it does not fit."""
        layout, size = _layout(inputs)
        if size > self.nbytes:
            return to_shared(inputs)
        slot = self._next
        while int(self.busy[worker, slot]):  # the main process has not taken this slot's batch yet
            time.sleep(0.0005)
        _fill(self.buffers[worker, slot], inputs, layout)
        self.busy[worker, slot] = 1
        self._next = (slot + 1) % self.slots
        return {SLOT: (worker, slot, layout, size), **_rest(inputs)}

    # -- main side -----------------------------------------------------------------------------------------
    def take(self, message: dict[str, Any], pin_memory: bool = False) -> dict[str, Any]:
        """The micro-batch's tensors, copied out of the worker's slot (then free again)."""
        if SHARED in message:
            buffer, layout = message[SHARED]
        elif SLOT in message:
            worker, slot, layout, size = message[SLOT]
            buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin_memory)
            # numpy's copy: one thread; torch's would wake the intra-op pool of the training process
            buffer.numpy()[:] = self.buffers[worker, slot, :size].numpy()
            self.busy[worker, slot] = 0
        else:
            return message  # built in this process (no workers): tensors as they are
        rest = {k: v for k, v in message.items() if k not in (SLOT, SHARED)}
        return {**rest, **_views(buffer, layout)}


def slot_bytes(micro_batch_tokens: int, num_visual_tokens: int, image_size: int) -> int:
    """Room for the largest concatenated micro-batch: four int64 token rows, cu_seqlens, and as many
    uint8 image canvases as the budget can hold (each image is at least `num_visual_tokens` tokens)."""
    tokens = int(micro_batch_tokens)
    images = tokens // max(1, int(num_visual_tokens))
    return (
        4 * 8 * tokens  # input_ids, labels, position_ids, segment_ids
        + 4 * (tokens + 2)  # cu_seqlens
        + images * (8 + image_size * image_size * 3)  # image_sizes, canvases
        + 8 * _ALIGN
    )
