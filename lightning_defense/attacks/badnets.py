from __future__ import annotations

import torch
from torch import Tensor

from lightning_defense.attacks.base import Attack, LabelMode, scaled_side
from lightning_defense.errors import ConfigurationError

#: the largest patch side: bigger than any image size this project handles
MAX_PATCH = 1024
#: the patch side on 32x32 images when none is given (the seed papers' 3x3 CIFAR patch)
PATCH_AT_32 = 3


class BadNets(Attack):
    """BadNets (Gu et al., 2017): a small patch of fixed random colours stamped on the image.

    Args:
        patch_size: side of the square patch in pixels; ``None`` scales it with the image, 3 pixels
            per 32 of the shorter side (3 at 32, 6 at 64, 21 at 224: the seed papers' CIFAR and
            ImageNet patches).
        position: top-left corner (row, column) of the patch; ``None`` puts it in the
            bottom-right corner.
    """

    def __init__(
        self,
        target: int = 0,
        poison_rate: float = 0.1,
        label_mode: LabelMode = "all_to_one",
        seed: int = 0,
        patch_size: int | None = None,
        position: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(target, poison_rate, label_mode, seed)
        if patch_size is not None and not 1 <= patch_size <= MAX_PATCH:
            raise ConfigurationError(f"patch_size must be in [1, {MAX_PATCH}] or null (scaled), got {patch_size}.")
        self.patch_size = patch_size
        self.position = tuple(position) if position is not None else None

    def side(self, height: int, width: int) -> int:
        """The patch side on images of this size."""
        if self.patch_size is not None:
            return self.patch_size
        return min(scaled_side(PATCH_AT_32, height, width), MAX_PATCH)

    def pattern(self, side: int) -> Tensor:
        """The seeded patch of this side, CHW in [0, 1]."""
        # colours on the uint8 grid, so a saved poisoned image holds exactly this patch
        colours = torch.randint(0, 256, (3, side, side), generator=self._generator(1))
        return colours.float() / 255

    def _corner(self, height: int, width: int) -> tuple[int, int]:
        if self.position is None:
            side = self.side(height, width)
            return height - side, width - side
        return self.position

    def check(self, image_size: tuple[int, int], num_classes: int) -> None:
        super().check(image_size, num_classes)
        self._check_fits(*image_size)

    def _check_fits(self, height: int, width: int) -> None:
        row, col = self._corner(height, width)
        side = self.side(height, width)
        if row < 0 or col < 0 or row + side > height or col + side > width:
            raise ConfigurationError(
                f"BadNets trigger ({side}x{side} at row {row}, column {col}) "
                f"does not fit in a {height}x{width} image: use a smaller patch_size or another position."
            )

    def apply(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        self._check_fits(height, width)
        row, col = self._corner(height, width)
        side = self.side(height, width)
        out = images.clone()
        out[..., row : row + side, col : col + side] = self.pattern(side).to(images)
        return out
