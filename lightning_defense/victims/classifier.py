"""The classifier wrapper every victim goes through: [0, 1] pixels in, logits out."""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy

import torch
from torch import Tensor, nn

from lightning_defense.victims.architectures import build_network
from lightning_defense.victims.feature_split import FeatureSplit, feature_split

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Classifier(nn.Module):
    """Wraps a network and owns its input normalization (contract 1).

    Callers always pass float images in [0, 1], NCHW; ``mean`` and ``std`` are buffers, so they
    travel with the weights. A frozen classifier (see :meth:`freeze`) refuses to leave eval mode,
    so a defense that calls ``.train()`` on itself cannot drift the victim's BatchNorm statistics.

    Args:
        arch: see :mod:`~lightning_defense.victims.architectures` (this project's names,
            ``torchvision/<builder>``, ``timm/<name>``).
        image_size: ``(height, width)`` of the images, for networks built for one size (timm's ViTs).
        feature_node: where :meth:`features` ends, for a network without a split of its own or
            timm's (a torchvision graph node name, e.g. ``layer3``); default: the input of the
            global pooling or token selection nearest the output.
        bgr: the network was trained on BGR images (OpenCV's order, e.g. the official REFINE
            code's victims); the wrapper still takes RGB and reverses the channels, before
            ``mean``/``std``, which are then in BGR order.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        image_size: tuple[int, int] | None = None,
        feature_node: str | None = None,
        bgr: bool = False,
    ) -> None:
        super().__init__()
        self.bgr = bgr
        self.arch = arch
        self.num_classes = num_classes
        self.image_size = tuple(image_size) if image_size is not None else None
        self.feature_node = feature_node
        self.network = build_network(arch, num_classes, self.image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.frozen = False
        self._split: FeatureSplit | None = None

    @property
    def split(self) -> FeatureSplit:
        """S_a / S_b of the network (built on first use, again after a move: a traced graph may
        hold tensors of its own)."""
        if self._split is None:
            self._split = feature_split(self.network, self.feature_node)
        return self._split

    def replace_network(self, network: nn.Module) -> None:
        """Swap in a network that computes the same function (e.g. BatchNorm folded into its
        convolutions); the split is traced again from it when next asked for."""
        self.network = network
        self._split = None

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), .cuda() ...
        self._split = None
        return super()._apply(fn, recurse)

    @property
    def linear_layer(self) -> nn.Linear:
        """The last linear layer (the classification head's weights)."""
        return self.split.linear

    def normalize(self, images: Tensor) -> Tensor:
        if self.bgr:
            images = images.flip(1)
        return (images - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        return self.network(self.normalize(images))

    def features(self, images: Tensor) -> Tensor:
        """S_a for [0, 1] images (e.g. ResNet-18's last stage, 512x4x4; see :attr:`split`)."""
        return self.split.features(self.normalize(images))

    def head(self, features: Tensor) -> Tensor:
        """S_b: logits from :meth:`features`; ``head(features(x))`` equals ``forward(x)``."""
        return self.split.head(features)

    @torch.no_grad()
    def predict_labels(self, images: Tensor, batch_size: int = 512) -> Tensor:
        """The predicted class of every image (uint8 or [0, 1] float, NCHW), in batches on this
        classifier's device: a victim's pseudo-labels for data that has no labels of its own."""
        device = self.mean.device
        labels = []
        for batch in images.split(batch_size):
            batch = batch.to(device)
            if batch.dtype == torch.uint8:
                batch = batch.float().div_(255)
            labels.append(self(batch).argmax(dim=1).cpu())
        return torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)

    def freeze(self) -> Classifier:
        """Eval mode and no gradients for good: the contract for a victim (contract 2)."""
        self.frozen = True
        self.requires_grad_(False)
        return self.train(False)

    def trainable_copy(self) -> Classifier:
        """A copy that trains (gradients, and train mode when asked): what a defense that repairs
        the victim fine-tunes, leaving the victim itself frozen."""
        copy = deepcopy(self)
        copy.frozen = False
        return copy.requires_grad_(True)

    def train(self, mode: bool = True) -> Classifier:
        return super().train(mode and not self.frozen)
