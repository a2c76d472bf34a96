"""What the tiled products (ovis_model.visual_head, ovis_model.tiled_loss) and the fused kernels share."""

from __future__ import annotations

from torch import nn

# One `[rows, cols]` tile of scores (and its gradient) stays in a core's L2 cache: 512 x 512 floats = 1 MiB.
TILE_ROWS = 512
TILE_COLS = 512


def zero3_partitioned(module: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 holds this module's weights as partitions: they are gathered only by calling
    the module, so code that reads `.weight` directly (the tiles, Liger's kernel) must not run on it."""
    return any(hasattr(p, "ds_id") for p in module.parameters())
