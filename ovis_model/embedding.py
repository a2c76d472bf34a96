"""The visual embedding table (VTE): a discrete lookup for ids, a soft lookup for distributions."""

from __future__ import annotations

import torch
from torch import nn


class VisualEmbedding(nn.Embedding):
    """`V x hidden` table looked up like a text embedding, or softly with probabilities.

    Integer input: ordinary row lookup. Floating input of last size k <= V: `probs @ weight[:k]`, i.e. a
    distribution over the first k visual words. k = V-2 lets patch distributions skip the two indicator
    rows without materialising zero-padded `[..., V]` tensors (equal to padding them with zeros).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Embedding's name)
        if not torch.is_floating_point(input):
            return super().forward(input)
        k = input.shape[-1]
        if k > self.num_embeddings:
            raise ValueError(f"distribution over {k} words, but the table has {self.num_embeddings} rows")
        weight = self.weight if k == self.num_embeddings else self.weight[:k]
        return torch.matmul(input.to(weight.dtype), weight)
