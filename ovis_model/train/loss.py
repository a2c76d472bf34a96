"""Loss normalisation by the global count of supervised tokens of an optimizer step.

Under packing, a mean of per-micro-batch means weighs a token of a short micro-batch more than one of a
long micro-batch. Here every supervised token of the step weighs the same: the step's loss is the sum of
token losses over all its micro-batches and ranks divided by their global count, which the loader gives
before any forward (`n_supervised` per micro-batch). DeepSpeed then averages gradients over ranks and
divides the loss by the accumulation steps in `engine.backward`, so each micro-batch's `loss_sum` is
divided by `global_count / (world_size * grad_accum)`; the gradients are then exactly those of
`sum(all token losses) / global_count`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist


def next_step(micro_batches: Iterator[dict], grad_accum: int) -> list[dict]:
    """The micro-batches of one optimizer step (fetched first: the normaliser needs all their counts)."""
    return [next(micro_batches) for _ in range(grad_accum)]


def all_reduce_sum(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """Sums over ranks (float64: exact for counts); the values themselves without a process group."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def global_supervised(step: Sequence[dict], device: torch.device | str = "cpu") -> int:
    """Supervised targets of the whole step: this rank's micro-batches, summed over ranks."""
    return int(all_reduce_sum([sum(mb["n_supervised"] for mb in step)], device)[0])


def loss_normalizer(global_count: int, world_size: int, grad_accum: int) -> float:
    """What each micro-batch's `loss_sum` is divided by (see the module docstring); a step without any
    supervised token (only possible when bad shards emptied it) divides by 1: its loss is 0 anyway."""
    return max(global_count, 1) / (world_size * grad_accum)
