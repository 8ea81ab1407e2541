from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_defense.attacks.base import Attack, LabelMode, to_float, to_uint8
from lightning_defense.errors import ConfigurationError


class WaNet(Attack):
    """WaNet (Nguyen & Tran, 2021): an imperceptible, fixed smooth warp of the image.

    Follows the official code: a random k x k flow field, normalized to mean absolute value 1,
    upsampled bicubically, scaled by ``s / height`` and applied with ``grid_sample``.
    In noise mode, ``cross_ratio`` x ``poison_rate`` of the training set is warped by the
    trigger plus a per-image random perturbation but keeps its label, so the network learns the
    exact warp rather than "any warp". The official code redraws that perturbation every batch;
    here it is drawn once per image from ``seed``, like the rest of a poisoned data set.

    Args:
        k: size of the control grid of the warp.
        s: strength of the warp; ``s = 0`` is the identity.
        grid_rescale: scale of the final sampling grid (1 in the paper).
        cross_ratio: noise-mode samples per poisoned sample; 0 turns noise mode off.
    """

    def __init__(
        self,
        target: int = 0,
        poison_rate: float = 0.1,
        label_mode: LabelMode = "all_to_one",
        seed: int = 0,
        k: int = 4,
        s: float = 0.5,
        grid_rescale: float = 1.0,
        cross_ratio: float = 2.0,
    ) -> None:
        super().__init__(target, poison_rate, label_mode, seed)
        if k < 2:
            raise ConfigurationError(f"k must be >= 2, got {k}.")
        if cross_ratio < 0 or poison_rate * (1 + cross_ratio) > 1:
            raise ConfigurationError(
                f"cross_ratio {cross_ratio} with poison_rate {poison_rate} asks for more than the "
                "whole training set: lower one of them."
            )
        self.k = k
        self.s = s
        self.grid_rescale = grid_rescale
        self.cross_ratio = cross_ratio
        self._flow = torch.rand(1, 2, k, k, generator=self._generator(1)) * 2 - 1
        self._flow /= self._flow.abs().mean()

    def grid(self, height: int, width: int) -> Tensor:
        """The trigger's sampling grid, 1 x H x W x 2, in grid_sample's [-1, 1] coordinates."""
        flow = F.interpolate(self._flow, size=(height, width), mode="bicubic", align_corners=True)
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        identity = torch.stack((cols, rows), dim=-1)[None]
        grid = (identity + self.s * flow.permute(0, 2, 3, 1) / height) * self.grid_rescale
        return grid.clamp(-1, 1)

    def _warp(self, images: Tensor, grid: Tensor) -> Tensor:
        grid = grid.to(images).expand(len(images), -1, -1, -1)
        return F.grid_sample(images, grid, align_corners=True).clamp(0, 1)

    def apply(self, images: Tensor) -> Tensor:
        return self._warp(images, self.grid(*images.shape[-2:]))

    def apply_noise(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Noise-mode warp: the trigger's grid plus a random per-image perturbation."""
        height, width = images.shape[-2:]
        noise = (torch.rand(len(images), height, width, 2, generator=generator) * 2 - 1) / height
        return self._warp(images, (self.grid(height, width) + noise).clamp(-1, 1))

    def poison_training_set(self, images: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
        images, labels, poisoned = super().poison_training_set(images, labels, num_classes)
        noise_count = round(self.cross_ratio * self.poison_rate * len(images))
        cross = self._after_poisoned(len(images), len(poisoned), noise_count)
        if len(cross):
            images[cross] = to_uint8(self.apply_noise(to_float(images[cross]), self._generator(2)))
        return images, labels, poisoned
