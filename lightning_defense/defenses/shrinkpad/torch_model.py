"""ShrinkPad (Li et al., 2021, "Backdoor attack in the physical world"): a pre-processing defense
that needs no training. Each input is shrunk by a few pixels and zero-padded back to its size at
a random position, which moves a trigger away from where the backdoor expects it."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF


class ShrinkPadTransform(nn.Module):
    """Shrink each image by ``shrink`` pixels per side length (bilinear), then pad it back with
    zeros at a uniformly random offset, drawn per image."""

    def __init__(self, shrink: int = 4) -> None:
        super().__init__()
        if shrink < 1:
            raise ValueError(f"shrink must be >= 1, got {shrink}.")
        self.shrink = shrink

    def forward(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        small = TF.resize(images, [height - self.shrink, width - self.shrink], antialias=True)
        out = torch.zeros_like(images)
        tops = torch.randint(0, self.shrink + 1, (len(images),)).tolist()
        lefts = torch.randint(0, self.shrink + 1, (len(images),)).tolist()
        for i, (top, left) in enumerate(zip(tops, lefts, strict=True)):
            out[i, :, top : top + height - self.shrink, left : left + width - self.shrink] = small[i]
        return out


class ShrinkPadDefense(nn.Module):
    """The defended model: the frozen victim on shrunk-and-padded inputs."""

    def __init__(self, victim: nn.Module, shrink: int = 4) -> None:
        super().__init__()
        self.victim = victim
        self.transform = ShrinkPadTransform(shrink)

    def forward(self, images: Tensor) -> Tensor:
        return self.victim(self.transform(images))
