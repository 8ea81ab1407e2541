from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from lightning_defense.attacks.base import Attack, LabelMode
from lightning_defense.errors import ConfigurationError, InputNotFoundError


def blend_pattern(pattern_path: str | None, generator: torch.Generator, height: int, width: int) -> Tensor:
    """A blend trigger, float CHW in [0, 1]: the image at ``pattern_path`` resized to the data's
    size, or, without one, uniform noise drawn from ``generator``."""
    if pattern_path is None:
        return torch.rand(3, height, width, generator=generator)
    image = decode_image(pattern_path, mode=ImageReadMode.RGB)
    return TF.resize(image, [height, width], antialias=True).float() / 255


def check_pattern_path(pattern_path: str | None) -> None:
    if pattern_path is not None and not Path(pattern_path).is_file():
        raise InputNotFoundError(f"Blend pattern image {pattern_path!r} does not exist.")


class Blended(Attack):
    """Blended (Chen et al., 2017): x' = (1 - alpha) x + alpha t for a fixed pattern t.

    Args:
        alpha: blend ratio in (0, 1].
        pattern_path: an image file to blend in (resized to the data's size); ``None`` uses a
            fixed uniform-noise pattern drawn from ``seed``.
    """

    def __init__(
        self,
        target: int = 0,
        poison_rate: float = 0.1,
        label_mode: LabelMode = "all_to_one",
        seed: int = 0,
        alpha: float = 0.1,
        pattern_path: str | None = None,
    ) -> None:
        super().__init__(target, poison_rate, label_mode, seed)
        if not 0 < alpha <= 1:
            raise ConfigurationError(f"alpha must be in (0, 1], got {alpha}.")
        check_pattern_path(pattern_path)
        self.alpha = alpha
        self.pattern_path = pattern_path

    def pattern(self, height: int, width: int) -> Tensor:
        """The trigger t for images of this size, float CHW in [0, 1]."""
        return blend_pattern(self.pattern_path, self._generator(1), height, width)

    def apply(self, images: Tensor) -> Tensor:
        pattern = self.pattern(*images.shape[-2:]).to(images)
        return (1 - self.alpha) * images + self.alpha * pattern
