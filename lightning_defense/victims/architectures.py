"""Classifier architectures for 32x32 inputs, registered by name.

Every network here takes *normalized* input; :class:`~lightning_defense.victims.classifier.Classifier`
wraps it, owns the normalization and takes [0, 1] pixels (contract 1). Each architecture names
``feature_layer``: the module whose output ends the feature extractor (S_a) and after which the
rest of the network is the head (S_b), and ``head`` runs S_b on those features, so that
``forward(x) == head(features(x))``. Trigger-inversion defenses split the victim there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_defense.errors import ConfigurationError


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class CifarResNet(nn.Module):
    """ResNet for 32x32 images: 3x3 stem, no max-pool.

    ``widths`` and ``blocks`` give one stage each; ResNet-18 is four stages of two blocks,
    ResNet-20 (He et al., 2016, CIFAR variant) three stages of three blocks.
    """

    feature_layer = "features"
    linear_layer = "fc"

    def __init__(
        self,
        block: type[nn.Module],
        widths: tuple[int, ...],
        blocks: tuple[int, ...],
        num_classes: int,
        preact: bool = False,
    ) -> None:
        super().__init__()
        stem: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)]
        if not preact:
            stem += [nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(block(in_planes, width, stride))
                in_planes = width
        if preact:  # pre-activation nets end with the BN+ReLU their blocks leave out
            layers += [nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*stem, *layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def head(self, features: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(features), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class VGG16BN(nn.Module):
    feature_layer = "features"
    linear_layer = "classifier.3"
    _config = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for v in self._config:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(True)]
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(512, 512), nn.ReLU(True), nn.Linear(512, num_classes))

    def head(self, features: Tensor) -> Tensor:
        return self.classifier(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def resnet18(num_classes: int) -> nn.Module:
    return CifarResNet(BasicBlock, (64, 128, 256, 512), (2, 2, 2, 2), num_classes)


def preact_resnet18(num_classes: int) -> nn.Module:
    return CifarResNet(PreActBlock, (64, 128, 256, 512), (2, 2, 2, 2), num_classes, preact=True)


def vgg16_bn(num_classes: int) -> nn.Module:
    return VGG16BN(num_classes)


def resnet20(num_classes: int) -> nn.Module:
    """The small network: 0.27M parameters, ~41 MMAC per image, trainable on 2 CPU cores."""
    return CifarResNet(BasicBlock, (16, 32, 64), (3, 3, 3), num_classes)


ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": resnet18,
    "preact_resnet18": preact_resnet18,
    "vgg16_bn": vgg16_bn,
    "resnet20": resnet20,
}


def build_network(arch: str, num_classes: int) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ConfigurationError(f"Unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}.")
    if num_classes < 2:
        raise ConfigurationError(f"num_classes must be at least 2, got {num_classes}.")
    return ARCHITECTURES[arch](num_classes)
