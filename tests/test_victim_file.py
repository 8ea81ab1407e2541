from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import RunsCode

from lightning_defense.attacks import BadNets, attack_from_config
from lightning_defense.victims import (
    Classifier,
    UntrustedCheckpointError,
    VictimMetadata,
    load_victim,
    read_victim_metadata,
    save_victim,
)

#: run again on the lowest versions pyproject.toml allows (`nox -s lowest`, .ci/run)
pytestmark = pytest.mark.trust_boundary


def make_victim(tmp_path: Path) -> tuple[Classifier, Path]:
    torch.manual_seed(0)
    classifier = Classifier("resnet20", 10)
    classifier.network.fc.bias.data.normal_()
    path = save_victim(
        tmp_path / "victim.safetensors",
        classifier,
        VictimMetadata("resnet20", 10, attack=BadNets(target=1).config()),
    )
    return classifier, path


def test_victim_round_trip_is_frozen_and_keeps_the_attack(tmp_path):
    classifier, path = make_victim(tmp_path)
    victim = load_victim(path)
    images = torch.rand(4, 3, 32, 32)
    assert torch.allclose(victim(images), classifier.eval()(images))
    assert not victim.training and not any(p.requires_grad for p in victim.parameters())
    victim.train()  # a defense calling .train() on itself must not wake the victim
    assert not victim.training and not any(m.training for m in victim.modules())
    attack = attack_from_config(read_victim_metadata(path).attack)
    assert isinstance(attack, BadNets) and attack.target == 1


def test_classifier_takes_pixels_and_owns_normalization():
    classifier = Classifier("resnet20", 10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()
    images = torch.rand(2, 3, 32, 32)
    assert torch.allclose(classifier(images), classifier.network((images - 0.5) / 0.25))


def test_a_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, path)
    with pytest.raises(UntrustedCheckpointError, match="pickled Python objects"):
        load_victim(path, arch="resnet20", num_classes=10)
    assert not marker.exists()


def test_truncated_and_missing_files_fail_clearly(tmp_path):
    _, path = make_victim(tmp_path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UntrustedCheckpointError, match="truncated"):
        load_victim(truncated)
    with pytest.raises(FileNotFoundError, match="lightning fit --config configs/victims"):
        load_victim(tmp_path / "nope.safetensors")


def test_class_count_mismatch_names_both_counts(tmp_path):
    _, path = make_victim(tmp_path)
    with pytest.raises(ValueError, match="victim .* has 10 classes but the data has 43"):
        load_victim(path, num_classes=43)


def test_bare_third_party_state_dict(tmp_path):
    network = Classifier("resnet20", 10).network
    path = tmp_path / "third_party.pth"
    torch.save(network.state_dict(), path)
    with pytest.raises(ValueError, match="pass `arch` and `num_classes`"):
        load_victim(path)
    victim = load_victim(path, arch="resnet20", num_classes=10)
    assert victim.frozen
    with pytest.raises(ValueError, match="do not fit"):
        load_victim(path, arch="resnet20", num_classes=43)


@pytest.mark.parametrize("arch", ["resnet18", "preact_resnet18", "vgg16_bn", "resnet20"])
def test_architectures_take_32x32_and_split_at_their_feature_layer(arch):
    classifier = Classifier(arch, 7).eval()
    images = torch.rand(2, 3, 32, 32)
    assert classifier(images).shape == (2, 7)
    # S_a is the network's `features` module's output, and S_b(S_a(x)) is the whole network
    captured = []
    classifier.network.features.register_forward_hook(lambda m, i, o: captured.append(o))
    logits = classifier(images)
    features = classifier.features(images)
    torch.testing.assert_close(features, captured[0])
    assert features.dim() == 4  # a feature map, before pooling
    torch.testing.assert_close(classifier.head(features), logits)


def test_resnet18_has_a_cifar_stem():
    network = Classifier("resnet18", 10).network
    first = network.features[0]
    assert first.kernel_size == (3, 3) and first.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in network.modules())


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(ValueError, match="resnet18, preact_resnet18"):
        Classifier("resnet1000", 10)


def test_victim_files_are_byte_identical_for_identical_content_and_readable_by_others(tmp_path):
    import hashlib
    import stat

    _, first = make_victim(tmp_path / "a")
    _, second = make_victim(tmp_path / "b")
    assert hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(first.stat().st_mode) == 0o666 & ~umask
    assert read_victim_metadata(first).attack["init_args"]["target"] == 1  # still a valid victim file
    assert not list(first.parent.glob("*.partial"))
