"""Classifier architectures, by name: this project's, third-party layouts, torchvision's and timm's.

An ``arch`` is one of

- a name of :data:`ARCHITECTURES`: this project's 32x32 networks (``resnet20``, ``resnet18``,
  ``preact_resnet18``, ``vgg16_bn``) and the layouts of the toolboxes researchers' files come
  from, with their parameter names unchanged so their state dicts load as saved:
  ``backdoorbench_preactresnet18`` (BackdoorBench's ``models/preact_resnet.py``) and
  ``backdoorbox_resnet18`` (BackdoorBox's ``core/models/resnet.py``, also the official REFINE
  code's victim); BackdoorBench's ``vgg19_bn`` is torchvision's, ``torchvision/vgg19_bn``;
- ``torchvision/<builder>``: any classification model of ``torchvision.models.get_model``
  (``torchvision/resnet18``, ``torchvision/vit_b_16``), without pretrained weights; ViTs are
  built for the victim's image size;
- ``timm/<name>``: any ``timm.create_model`` name (``timm/resnet18``, ``timm/vit_tiny_patch16_224``);
  models with a fixed input size (ViTs) are built for the victim's image size;
- the import path of any ``nn.Module`` class (``mypackage.nets.MyNet``), built as
  ``MyNet(num_classes=K)``, once a config or program allows it (:func:`allow_network`; the CLI's
  ``victim_networks: [mypackage.nets.MyNet]``): a victim file names its class but never chooses
  what is imported (contract 3).

Every network takes *normalized* input; :class:`~lightning_defense.victims.classifier.Classifier`
wraps it, owns the normalization and takes [0, 1] pixels (contract 1). Where the features end
and the head begins is :mod:`~lightning_defense.victims.feature_split`'s business; this
project's networks define it themselves (``features``, ``head``, ``linear_layer``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
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


class _BackdoorBenchPreActBlock(PreActBlock):
    """BackdoorBench's PreActBlock: this project's, with the shortcut conv inside a Sequential
    (parameter names ``shortcut.0.*``). BackdoorBox's BasicBlock is this project's as it is."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__(in_planes, planes, stride)
        if self.shortcut is not None:
            self.shortcut = nn.Sequential(self.shortcut)


def _stages(block: type[nn.Module], widths: tuple[int, ...], strides: tuple[int, ...]) -> list[nn.Sequential]:
    stages, in_planes = [], 64
    for width, stride in zip(widths, strides, strict=True):
        stages.append(nn.Sequential(block(in_planes, width, stride), block(width, width, 1)))
        in_planes = width
    return stages


class BackdoorBenchPreActResNet18(nn.Module):
    """BackdoorBench's PreActResNet-18 (``models/preact_resnet.py``), parameter names as theirs:
    no stem BN and no final BN+ReLU, unlike this project's ``preact_resnet18``."""

    linear_layer = "linear"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.layer1, self.layer2, self.layer3, self.layer4 = _stages(
            _BackdoorBenchPreActBlock, (64, 128, 256, 512), (1, 2, 2, 2)
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))

    def head(self, features: Tensor) -> Tensor:
        return self.linear(torch.flatten(self.avgpool(features), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class BackdoorBoxResNet18(nn.Module):
    """BackdoorBox's ResNet-18 (``core/models/resnet.py``; the official REFINE code's victim),
    parameter names as theirs. Its pooling is theirs too: a fixed 4x4 average, made for 32x32."""

    linear_layer = "linear"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1, self.layer2, self.layer3, self.layer4 = _stages(BasicBlock, (64, 128, 256, 512), (1, 2, 2, 2))
        self.linear = nn.Linear(512, num_classes)

    def features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))

    def head(self, features: Tensor) -> Tensor:
        return self.linear(torch.flatten(F.avg_pool2d(features, 4), 1))

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
    "backdoorbench_preactresnet18": BackdoorBenchPreActResNet18,
    "backdoorbox_resnet18": BackdoorBoxResNet18,
}

LIBRARIES = ("torchvision", "timm")

#: nn.Module classes that victims may name by import path, allowed by configs and programs (never by files)
_ALLOWED_NETWORKS: set[str] = set()


def is_class_path(arch: str) -> bool:
    """Whether ``arch`` names an nn.Module class by import path (``mypackage.nets.MyNet``), not a
    name of this project or a ``library/model`` (timm names may hold dots, never without a slash)."""
    return "." in arch and "/" not in arch


def allow_network(class_path: str) -> None:
    """Let victims name the ``nn.Module`` class at ``class_path`` as their ``arch``. Only code and
    configs call this: a victim file that names a class nobody allowed is refused, unimported."""
    _ALLOWED_NETWORKS.add(class_path)


def build_network(arch: str, num_classes: int, image_size: tuple[int, int] | None = None) -> nn.Module:
    """A freshly initialised network (no pretrained weights: a victim's come from its file)."""
    if num_classes < 2:
        raise ConfigurationError(f"num_classes must be at least 2, got {num_classes}.")
    library, _, name = arch.partition("/")
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch](num_classes)
    if library == "torchvision" and name:
        return _torchvision_network(name, num_classes, image_size)
    if library == "timm" and name:
        return _timm_network(name, num_classes, image_size)
    if is_class_path(arch):
        return _allowed_network(arch, num_classes)
    raise ConfigurationError(
        f"Unknown architecture {arch!r}: use one of {', '.join(ARCHITECTURES)}, "
        "`torchvision/<builder>` (e.g. torchvision/resnet18), `timm/<model name>` (e.g. timm/resnet18) or the "
        "import path of your nn.Module class (e.g. mypackage.nets.MyNet, allowed in the config's victim_networks)."
    )


def _allowed_network(class_path: str, num_classes: int) -> nn.Module:
    if class_path not in _ALLOWED_NETWORKS:
        raise ConfigurationError(
            f"The victim's architecture is the class {class_path!r}, which was not imported: a file never chooses "
            f"code to run. If you trust it, allow it in the config (`victim_networks: [{class_path}]`, or "
            f"`--victim_networks+={class_path}`) or in Python with `allow_network({class_path!r})`."
        )
    module_name, _, class_name = class_path.rpartition(".")
    try:
        network_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ConfigurationError(f"Cannot import the network class {class_path!r}: {err}.") from err
    if not (isinstance(network_class, type) and issubclass(network_class, nn.Module)):
        raise ConfigurationError(f"{class_path!r} is not an nn.Module class.")
    try:
        return network_class(num_classes=num_classes)
    except TypeError as err:
        raise ConfigurationError(
            f"{class_path}(num_classes={num_classes}) failed ({err}): a victim network class takes its class "
            "count as `num_classes` (other arguments need defaults)."
        ) from err


def _torchvision_network(name: str, num_classes: int, image_size: tuple[int, int] | None) -> nn.Module:
    from torchvision import models

    if name not in models.list_models(module=models):  # classification models only
        raise ConfigurationError(
            f"torchvision has no classification model {name!r}; `torchvision.models.list_models()` lists them."
        )
    if image_size is not None and image_size[0] == image_size[1]:
        try:  # models made for one input size (ViTs) are built for the victim's
            return models.get_model(name, weights=None, num_classes=num_classes, image_size=image_size[0])
        except TypeError:  # the model takes any size (CNNs) and no image_size argument
            pass
    return models.get_model(name, weights=None, num_classes=num_classes)


def _timm_network(name: str, num_classes: int, image_size: tuple[int, int] | None) -> nn.Module:
    try:
        import timm
    except ImportError as err:  # timm comes with segmentation-models-pytorch, but may be removed
        raise ConfigurationError(f"timm/{name} needs timm: `pip install timm`.") from err
    if not timm.is_model(name):
        raise ConfigurationError(f"timm has no model {name!r}; `timm.list_models('*{name[:6]}*')` lists similar ones.")
    if image_size is not None:
        try:  # models made for one input size (ViTs) are built for the victim's
            return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=image_size)
        except TypeError:  # the model takes any size (CNNs) and no img_size argument
            pass
    return timm.create_model(name, pretrained=False, num_classes=num_classes)
