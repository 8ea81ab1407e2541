"""Training augmentations as torchvision v2 transforms a config names by ``class_path``, and
REFINE's augmentation of a batch (a fresh random draw per image)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.transforms import v2


class CropFlip(v2.Transform):
    """Random crop after zero padding, and a horizontal flip: the usual training augmentation of
    CIFAR-style classifiers (no flip for data where mirroring changes the meaning, e.g. signs).
    The crop keeps each image's own size."""

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        super().__init__()
        self.padding = padding
        self.flip = flip

    def forward(self, image: Tensor) -> Tensor:
        image = v2.RandomCrop(tuple(image.shape[-2:]), padding=self.padding)(image)
        return v2.RandomHorizontalFlip()(image) if self.flip else image


class RefineAugmentation(v2.Compose):
    """The official REFINE recipe's augmentation: RandomResizedCrop at scale 0.8 to 1, horizontal
    flip, RandomGrayscale p 0.2."""

    def __init__(self, size: int | tuple[int, int] = 32) -> None:
        super().__init__(
            [v2.RandomResizedCrop(size, scale=(0.8, 1.0)), v2.RandomHorizontalFlip(), v2.RandomGrayscale(p=0.2)]
        )


def augment_each(transform: v2.Transform, images: Tensor) -> Tensor:
    """``transform`` on a batch with its own random draw for every image (a v2 transform called
    on a batch draws once for all of it)."""
    return torch.stack([transform(image) for image in images])


class BatchAugmentation(nn.Module):
    """:class:`RefineAugmentation` on a batch, a random draw per image."""

    def forward(self, images: Tensor) -> Tensor:
        return augment_each(RefineAugmentation(tuple(images.shape[-2:])), images)
