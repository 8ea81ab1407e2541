"""REFINE's training augmentation (RandomResizedCrop at scale 0.8 to 1, horizontal flip,
RandomGrayscale p 0.2), as a dataset transform and as a module that augments a batch."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.transforms import v2


def refine_augmentation(size: int | tuple[int, int]) -> v2.Compose:
    """The official recipe's augmentation, for images of ``size``."""
    return v2.Compose(
        [v2.RandomResizedCrop(size, scale=(0.8, 1.0)), v2.RandomHorizontalFlip(), v2.RandomGrayscale(p=0.2)]
    )


def augment_each(transform: v2.Transform, images: Tensor) -> Tensor:
    """``transform`` on a batch with its own random draw for every image (a v2 transform called
    on a batch draws once for all of it)."""
    return torch.stack([transform(image) for image in images])


class BatchAugmentation(nn.Module):
    """:func:`refine_augmentation` on a batch, a random draw per image."""

    def forward(self, images: Tensor) -> Tensor:
        return augment_each(refine_augmentation(tuple(images.shape[-2:])), images)
