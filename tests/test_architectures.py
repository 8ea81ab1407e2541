"""Victims from the libraries and toolboxes users already have (issue 28): torchvision and timm
networks split into features and head by the libraries' own APIs, and third-party state dicts
(BackdoorBench, BackdoorBox) that load under their own parameter names and predict as before."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_fault_tolerance import lightning, one_clear_error
from torch import nn

from lightning_defense.errors import ConfigurationError
from lightning_defense.victims import Classifier, load_victim, read_victim_metadata
from lightning_defense.victims.wrap import wrap

BACKDOORBENCH_CIFAR10 = ([0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261])


@pytest.mark.parametrize(
    ("arch", "size"),
    [
        ("torchvision/resnet18", 32),
        ("torchvision/mobilenet_v3_small", 64),
        ("torchvision/vit_b_16", 64),  # built for 64x64: 16 patches and the class token
        ("timm/resnet18", 64),
        ("timm/vit_tiny_patch16_224", 64),
        ("backdoorbench_preactresnet18", 32),
        ("backdoorbox_resnet18", 32),
    ],
)
def test_every_network_splits_into_features_and_a_head_that_give_its_output(arch, size):
    torch.manual_seed(0)
    classifier = Classifier(arch, 7, image_size=(size, size)).freeze()
    nn.init.normal_(classifier.linear_layer.weight)  # some libraries start the head at zero
    images = torch.rand(2, 3, size, size)
    features = classifier.features(images)
    assert features.dim() >= 3  # a feature map or token sequence, before the pooling
    torch.testing.assert_close(classifier.head(features), classifier(images), atol=1e-4, rtol=1e-4)
    # the named linear layer is the output layer: zeroing it zeroes the logits
    assert classifier.linear_layer.out_features == 7
    copy = classifier.trainable_copy()
    nn.init.zeros_(copy.linear_layer.weight), nn.init.zeros_(copy.linear_layer.bias)
    assert torch.count_nonzero(copy(images)) == 0 and torch.count_nonzero(copy.head(copy.features(images))) == 0
    assert torch.count_nonzero(classifier(images)) > 0  # the copy's split is its own, not the victim's


def test_a_torchvision_network_splits_at_a_named_module_or_says_where_it_can():
    classifier = Classifier("torchvision/resnet18", 5, feature_node="layer3").eval()
    images = torch.rand(2, 3, 32, 32)
    features = classifier.features(images)
    assert features.shape[1] == 256  # layer3's channels, not layer4's 512
    torch.testing.assert_close(classifier.head(features), classifier(images))
    with pytest.raises(ConfigurationError, match="no graph node 'layer9'.*avgpool"):
        Classifier("torchvision/resnet18", 5, feature_node="layer9").features(images)


def test_a_split_survives_a_change_of_dtype():
    classifier = Classifier("torchvision/resnet18", 5).eval()
    classifier.features(torch.rand(1, 3, 32, 32))  # built for float32
    images = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    assert classifier.double().features(images).dtype == torch.float64


@pytest.mark.parametrize("arch", ["torchvision/no_such_net", "timm/no_such_net", "keras/resnet"])
def test_an_unknown_architecture_is_one_error_naming_the_forms(arch):
    with pytest.raises(ConfigurationError, match="no_such_net|torchvision/<builder>"):
        Classifier(arch, 10)


# BackdoorBench's models/preact_resnet.py and BackdoorBox's core/models/resnet.py, as published
# (their parameter names and forward passes): the reference the importers must reproduce
class BackdoorBenchPreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.ind = None
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class BackdoorBoxBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class PublishedResNet(nn.Module):
    """Both toolboxes' ResNet-18 skeleton; ``preact`` selects BackdoorBench's variant."""

    def __init__(self, preact: bool, num_classes=10):
        super().__init__()
        block = BackdoorBenchPreActBlock if preact else BackdoorBoxBasicBlock
        self.preact = preact
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        if not preact:
            self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, 2, stride=1)
        self.layer2 = self._make_layer(block, 128, 2, stride=2)
        self.layer3 = self._make_layer(block, 256, 2, stride=2)
        self.layer4 = self._make_layer(block, 512, 2, stride=2)
        if preact:
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x) if self.preact else F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.avgpool(out) if self.preact else F.avg_pool2d(out, 4)
        return self.linear(out.view(out.size(0), -1))


def trained_looking(network: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine weights, so a misplaced layer changes the answer."""
    torch.manual_seed(1)
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1), module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5), module.bias.data.normal_(0, 0.1)
    return network.eval()


@pytest.mark.parametrize(
    ("arch", "preact", "normalization", "bgr"),
    [
        ("backdoorbench_preactresnet18", True, BACKDOORBENCH_CIFAR10, False),
        ("backdoorbox_resnet18", False, ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]), False),  # BackdoorBox feeds [0, 1] pixels
        # the official REFINE code: BackdoorBox's network on OpenCV's BGR images, its own std
        ("backdoorbox_resnet18", False, ([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]), True),
    ],
)
def test_a_toolbox_state_dict_loads_under_its_own_names_and_predicts_as_its_network(
    arch, preact, normalization, bgr, tmp_path
):
    reference = trained_looking(PublishedResNet(preact))
    # BackdoorBench's attack_result.pt: the state dict under `model`, beside other entries
    torch.save({"model": reference.state_dict(), "model_name": "preactresnet18", "num_classes": 10}, tmp_path / "r.pt")
    mean, std = normalization
    out = tmp_path / "v.safetensors"
    wrap(tmp_path / "r.pt", out=out, arch=arch, num_classes=10, mean=mean, std=std, key="model", bgr=bgr)
    victim = load_victim(tmp_path / "v.safetensors")
    images = torch.rand(8, 3, 32, 32)  # RGB, as everywhere in lightning-defense
    seen = images.flip(1) if bgr else images  # what the toolbox's own pipeline fed its network
    expected = reference((seen - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    torch.testing.assert_close(victim(images), expected, atol=1e-4, rtol=1e-4)
    assert victim.frozen and read_victim_metadata(tmp_path / "v.safetensors").arch == arch


def test_a_bare_torchvision_state_dict_loads_and_predicts_as_its_network(tmp_path):
    import torchvision

    reference = trained_looking(torchvision.models.resnet18(num_classes=10))
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, tmp_path / "dp.pt")  # DataParallel
    wrap(
        tmp_path / "dp.pt",
        out=tmp_path / "v.safetensors",
        arch="torchvision/resnet18",
        num_classes=10,
        image_size=(32, 32),
    )
    images = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(load_victim(tmp_path / "v.safetensors")(images), reference(images))
    assert read_victim_metadata(tmp_path / "v.safetensors").image_size() == (32, 32)


def test_wrap_from_the_command_line_prints_what_it_wrote_and_refuses_what_does_not_fit(tmp_path):
    import torchvision

    torch.save({"model": torchvision.models.resnet18(num_classes=10).state_dict()}, tmp_path / "r.pt")
    base = ("wrap", "r.pt", "--num_classes", "10", "--out", "v.safetensors")
    result = lightning(
        *base,
        "--arch",
        "torchvision/resnet18",
        "--key",
        "model",
        "--attack",
        '{"class_path": "BadNets", "init_args": {"target": 3}}',
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torchvision/resnet18, 10 classes" in result.stdout and "BadNets" in result.stdout
    assert read_victim_metadata(tmp_path / "v.safetensors").attack["init_args"]["target"] == 3
    written = (tmp_path / "v.safetensors").read_bytes()
    one_clear_error(lightning(*base, "--arch", "torchvision/resnet18", "--key", "model", cwd=tmp_path), "exists")
    assert (tmp_path / "v.safetensors").read_bytes() == written  # not overwritten
    one_clear_error(
        lightning(*base[:-1], "w.safetensors", "--arch", "torchvision/resnet18", cwd=tmp_path),
        "not a state dict",
        "--key",
    )
    one_clear_error(
        lightning(*base[:-1], "w.safetensors", "--arch", "torchvision/resnet34", "--key", "model", cwd=tmp_path),
        "do not fit 'torchvision/resnet34'",
        "Missing key",
    )
    assert not (tmp_path / "w.safetensors").exists()
