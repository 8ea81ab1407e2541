"""Attacks whose trigger is a whole-image transformation: BATT (a rotation), SIG (a sinusoidal
signal, clean-label) and BppAttack (colour-depth reduction)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from lightning_defense.attacks.base import Attack, LabelMode
from lightning_defense.errors import ConfigurationError


class BATT(Attack):
    """BATT (Xu et al., 2023): a fixed spatial transformation, here a rotation by ``angle``
    degrees (nearest neighbour, uncovered corners black), is the trigger.

    Args:
        angle: rotation in degrees, counter-clockwise (the seeds' 16).
    """

    def __init__(
        self,
        target: int = 0,
        poison_rate: float = 0.1,
        label_mode: LabelMode = "all_to_one",
        seed: int = 0,
        angle: float = 16.0,
    ) -> None:
        super().__init__(target, poison_rate, label_mode, seed)
        if angle % 360 == 0:
            raise ConfigurationError(f"angle {angle} leaves images unchanged: choose a rotation that is not 0.")
        self.angle = angle

    def apply(self, images: Tensor) -> Tensor:
        return TF.rotate(images, self.angle, interpolation=InterpolationMode.NEAREST, fill=0.0)


class SIG(Attack):
    """SIG (Barni et al., 2019), a clean-label attack: a horizontal sinusoid
    ``delta * sin(2 pi j f / width)`` (``delta`` in 0-255 pixel units) is added to target-class
    training images, whose labels stay; at test time the same signal on any image pulls it to the
    target. ``poison_rate`` is the share of the target class that is poisoned.

    Args:
        delta: amplitude, in 0-255 pixel units (the seeds' 20).
        frequency: periods across the image width (the seeds' 6).
    """

    clean_label = True

    def __init__(
        self,
        target: int = 0,
        poison_rate: float = 0.1,
        label_mode: LabelMode = "all_to_one",
        seed: int = 0,
        delta: float = 20.0,
        frequency: float = 6.0,
    ) -> None:
        super().__init__(target, poison_rate, label_mode, seed)
        if delta <= 0 or frequency <= 0:
            raise ConfigurationError(f"delta and frequency must be > 0, got {delta} and {frequency}.")
        self.delta = delta
        self.frequency = frequency

    def signal(self, width: int) -> Tensor:
        """The additive signal of one row, in [0, 1] units."""
        columns = torch.arange(width, dtype=torch.float32)
        return self.delta / 255 * torch.sin(2 * math.pi * columns * self.frequency / width)

    def apply(self, images: Tensor) -> Tensor:
        return (images + self.signal(images.shape[-1]).to(images)).clamp(0, 1)


class BppAttack(Attack):
    """BppAttack (Wang et al., 2022): the trigger is colour-depth reduction, each channel squeezed
    to ``levels`` values (optionally with Floyd-Steinberg dithering). ``negative_ratio`` of the
    training set (drawn after the poisoned images, in the same seeded order) become *negative*
    samples that keep their labels: an image plus the quantization residual of another image, so
    the network must learn an image's own quantization, not any such texture (the official
    training's negatives).

    Args:
        levels: values per channel after quantization (the seeds' 8).
        dithering: Floyd-Steinberg error diffusion instead of plain rounding.
        negative_ratio: share of the training set made negative samples.
    """

    def __init__(
        self,
        target: int = 0,
        poison_rate: float = 0.1,
        label_mode: LabelMode = "all_to_one",
        seed: int = 0,
        levels: int = 8,
        dithering: bool = False,
        negative_ratio: float = 0.1,
    ) -> None:
        super().__init__(target, poison_rate, label_mode, seed)
        if not 2 <= levels <= 128:
            raise ConfigurationError(f"levels must be in 2..128 (fewer than the 256 of uint8), got {levels}.")
        if not 0 <= negative_ratio <= 1 or poison_rate + negative_ratio > 1:
            raise ConfigurationError(
                f"negative_ratio must be in [0, 1] and poison_rate + negative_ratio <= 1, got {negative_ratio}."
            )
        self.levels = levels
        self.dithering = dithering
        self.negative_ratio = negative_ratio

    def _round(self, values: Tensor) -> Tensor:
        steps = self.levels - 1
        return torch.round(values * steps) / steps

    def apply(self, images: Tensor) -> Tensor:
        if not self.dithering:
            return self._round(images)
        out = images.clone()  # Floyd-Steinberg, pixel by pixel, every image and channel at once
        height, width = out.shape[-2:]
        for row in range(height):
            for col in range(width):
                old = out[..., row, col].clone()
                new = self._round(old.clamp(0, 1))
                out[..., row, col] = new
                error = old - new
                if col + 1 < width:
                    out[..., row, col + 1] += error * 7 / 16
                if row + 1 < height:
                    if col > 0:
                        out[..., row + 1, col - 1] += error * 3 / 16
                    out[..., row + 1, col] += error * 5 / 16
                    if col + 1 < width:
                        out[..., row + 1, col + 1] += error * 1 / 16
        return out.clamp(0, 1)

    def poison_training_set(self, images: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
        clean = images
        images, labels, poisoned = super().poison_training_set(images, labels, num_classes)
        negatives = self._after_poisoned(len(images), len(poisoned), round(self.negative_ratio * len(images)))
        if len(negatives):
            others = torch.randint(0, len(images), (len(negatives),), generator=self._generator(3))
            residual = self._apply_uint8(clean[others]).float() - clean[others].float()
            images[negatives] = (clean[negatives].float() + residual).round().clamp(0, 255).to(torch.uint8)
        return images, labels, poisoned
