"""Procedural, class-dependent images: a DataModule that needs no files at all."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_defense.data.datamodules import BackdoorDataModule
from lightning_defense.errors import ConfigurationError


def procedural_images(
    num_classes: int, per_class: int, image_size: tuple[int, int], generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Each class is a sinusoidal grating with its own orientation, frequency and colour pair;
    every image draws its phase, contrast, a shift of the class's orientation and pixel noise,
    so classes are learnable but not trivially separable."""
    height, width = image_size
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    n = len(labels)
    angle = math.pi * labels / num_classes + 0.15 * torch.randn(n, generator=generator)
    freq = 2 * math.pi * (1.5 + 3.0 * ((labels * 7) % num_classes) / num_classes)
    phase = 2 * math.pi * torch.rand(n, generator=generator)
    rows = torch.linspace(0, 1, height).view(1, height, 1)
    cols = torch.linspace(0, 1, width).view(1, 1, width)
    proj = cols * angle.cos().view(n, 1, 1) + rows * angle.sin().view(n, 1, 1)
    wave = torch.sin(freq.view(n, 1, 1) * proj + phase.view(n, 1, 1))
    palette = torch.rand(num_classes, 2, 3, generator=torch.Generator().manual_seed(12345))
    low, high = palette[labels, 0].view(n, 3, 1, 1), palette[labels, 1].view(n, 3, 1, 1)
    contrast = 0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=generator)
    mix = (0.5 + 0.5 * contrast * wave.unsqueeze(1)).clamp(0, 1)
    images = low + (high - low) * mix + 0.08 * torch.randn(n, 3, height, width, generator=generator)
    return images.clamp(0, 1).mul(255).round().to(torch.uint8), labels


class SyntheticDataModule(BackdoorDataModule):
    """Procedural images (see :func:`procedural_images`), deterministic by ``data_seed``.

    For tests, demos and as a synthetic auxiliary source; nothing is read from disk.
    """

    def __init__(
        self,
        num_classes: int = 10,
        train_per_class: int = 500,
        test_per_class: int = 100,
        image_size: tuple[int, int] = (32, 32),
        data_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ConfigurationError(f"num_classes must be at least 2, got {num_classes}.")
        self.num_classes = num_classes
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        self.image_size = tuple(image_size)
        self.data_seed = data_seed

    def load_train(self) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(self.data_seed)
        return procedural_images(self.num_classes, self.train_per_class, self.image_size, generator)

    def load_test(self) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(self.data_seed + 1_000_003)
        return procedural_images(self.num_classes, self.test_per_class, self.image_size, generator)
