"""M, a fixed label permutation on a classifier's outputs (REFINE's hard-coded remapping)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_defense.errors import ConfigurationError


def derangement(num_classes: int, seed: int) -> Tensor:
    """A seeded permutation of ``range(num_classes)`` with no fixed point."""
    if num_classes < 2:
        raise ConfigurationError(f"A label permutation needs at least 2 classes, got {num_classes}.")
    generator = torch.Generator().manual_seed(seed)
    identity = torch.arange(num_classes)
    while True:  # about e (2.72) draws on average
        permutation = torch.randperm(num_classes, generator=generator)
        if not (permutation == identity).any():
            return permutation


class LabelPermutation(nn.Module):
    """M: output j of the defended model is the victim's output ``permutation[j]``.

    The permutation is a buffer, so it is saved with the weights and restored on load.
    """

    def __init__(self, num_classes: int, seed: int = 0, enabled: bool = True) -> None:
        super().__init__()
        permutation = derangement(num_classes, seed) if enabled else torch.arange(num_classes)
        self.register_buffer("permutation", permutation)

    def forward(self, logits: Tensor) -> Tensor:
        return logits[:, self.permutation]
