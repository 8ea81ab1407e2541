from __future__ import annotations

import torch
from torch import Tensor

from lightning_defense.attacks.base import Attack, LabelMode
from lightning_defense.errors import ConfigurationError

#: the largest patch side: bigger than any image size this project handles
MAX_PATCH = 1024


class BadNets(Attack):
    """BadNets (Gu et al., 2017): a small patch of fixed random colours stamped on the image.

    Args:
        patch_size: side of the square patch in pixels (3 by default).
        position: top-left corner (row, column) of the patch; ``None`` puts it in the
            bottom-right corner.
    """

    def __init__(
        self,
        target: int = 0,
        poison_rate: float = 0.1,
        label_mode: LabelMode = "all_to_one",
        seed: int = 0,
        patch_size: int = 3,
        position: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(target, poison_rate, label_mode, seed)
        if not 1 <= patch_size <= MAX_PATCH:  # the pattern is drawn now, before any image size is known
            raise ConfigurationError(f"patch_size must be in [1, {MAX_PATCH}], got {patch_size}.")
        self.patch_size = patch_size
        self.position = tuple(position) if position is not None else None
        # colours on the uint8 grid, so a saved poisoned image holds exactly this patch
        colours = torch.randint(0, 256, (3, patch_size, patch_size), generator=self._generator(1))
        self.pattern = colours.float() / 255

    def _corner(self, height: int, width: int) -> tuple[int, int]:
        if self.position is None:
            return height - self.patch_size, width - self.patch_size
        return self.position

    def check(self, image_size: tuple[int, int], num_classes: int) -> None:
        super().check(image_size, num_classes)
        self._check_fits(*image_size)

    def _check_fits(self, height: int, width: int) -> None:
        row, col = self._corner(height, width)
        if row < 0 or col < 0 or row + self.patch_size > height or col + self.patch_size > width:
            raise ConfigurationError(
                f"BadNets trigger ({self.patch_size}x{self.patch_size} at row {row}, column {col}) "
                f"does not fit in a {height}x{width} image: use a smaller patch_size or another position."
            )

    def apply(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        self._check_fits(height, width)
        row, col = self._corner(height, width)
        out = images.clone()
        out[..., row : row + self.patch_size, col : col + self.patch_size] = self.pattern.to(images)
        return out
