from __future__ import annotations

import pytest
import torch

from lightning_defense.attacks import BadNets, Blended, WaNet, attack_from_config
from lightning_defense.attacks.base import to_float, to_uint8


def batch(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_badnets_changes_only_the_trigger_pixels():
    images = batch()
    poisoned = BadNets(patch_size=3).apply(images)
    changed = (poisoned != images).any(dim=1)  # N x H x W
    assert changed[:, -3:, -3:].float().mean() > 0.9  # random colours can match a pixel by chance
    changed[:, -3:, -3:] = False
    assert not changed.any()
    assert torch.equal(poisoned[0, :, -3:, -3:], poisoned[5, :, -3:, -3:])


def test_badnets_position_and_seeded_pattern():
    a, b = BadNets(position=(0, 0), seed=1), BadNets(position=(0, 0), seed=1)
    assert torch.equal(a.pattern, b.pattern)
    assert not torch.equal(a.pattern, BadNets(seed=2).pattern)
    out = a.apply(batch())
    assert torch.equal(out[:, :, :3, :3], a.pattern.expand(8, -1, -1, -1))


def test_blended_is_a_convex_blend():
    attack = Blended(alpha=0.1)
    images = batch()
    pattern = attack.pattern(32, 32)
    assert torch.allclose(attack.apply(images), 0.9 * images + 0.1 * pattern)
    assert torch.equal(pattern, Blended(alpha=0.1).pattern(32, 32))


def test_blended_reads_a_pattern_image(tmp_path):
    from torchvision.io import write_png

    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    image[0] = 255
    write_png(image, str(tmp_path / "red.png"))
    attack = Blended(alpha=0.5, pattern_path=str(tmp_path / "red.png"))
    pattern = attack.pattern(32, 32)
    assert pattern.shape == (3, 32, 32)
    assert torch.allclose(pattern[0], torch.ones(32, 32)) and pattern[1:].abs().max() == 0


def test_wanet_with_zero_strength_is_the_identity():
    images = batch()
    assert torch.allclose(WaNet(s=0.0).apply(images), images, atol=1e-5)
    warped = WaNet(s=0.5).apply(images)
    assert not torch.allclose(warped, images, atol=1e-2)
    assert warped.min() >= 0 and warped.max() <= 1


@pytest.mark.parametrize("mode", ["all_to_one", "all_to_all"])
def test_poisoned_training_labels_and_indices(mode):
    images = to_uint8(batch(200))
    labels = torch.arange(200) % 10
    attack = BadNets(target=3, poison_rate=0.1, label_mode=mode, seed=7)
    poisoned_images, poisoned_labels, indices = attack.poison_training_set(images, labels, 10)
    assert len(indices) == 20 and len(indices.unique()) == 20
    clean = torch.ones(200, dtype=torch.bool)
    clean[indices] = False
    assert torch.equal(poisoned_images[clean], images[clean])
    assert torch.equal(poisoned_labels[clean], labels[clean])
    expected = torch.full((20,), 3) if mode == "all_to_one" else (labels[indices] + 1) % 10
    assert torch.equal(poisoned_labels[indices], expected)
    assert not torch.equal(poisoned_images[indices], images[indices])
    # the same seed picks the same samples; another seed other ones
    assert torch.equal(attack.poison_training_set(images, labels, 10)[2], indices)
    assert not torch.equal(BadNets(seed=8).poison_training_set(images, labels, 10)[2], indices)


def test_poisoned_test_set_leaves_out_the_target_class():
    images, labels = to_uint8(batch(100)), torch.arange(100) % 10
    _, poisoned_labels = BadNets(target=2).poison_test_set(images, labels, 10)
    assert len(poisoned_labels) == 90 and (poisoned_labels == 2).all()
    _, all_to_all = BadNets(label_mode="all_to_all").poison_test_set(images, labels, 10)
    assert torch.equal(all_to_all, (labels + 1) % 10)


def test_wanet_noise_mode_keeps_labels_of_noise_samples():
    images, labels = to_uint8(batch(100)), torch.arange(100) % 10
    attack = WaNet(poison_rate=0.1, cross_ratio=2.0)
    poisoned_images, poisoned_labels, indices = attack.poison_training_set(images, labels, 10)
    changed = (poisoned_images != images).flatten(1).any(1)
    assert changed.sum() == 30  # 10 poisoned + 20 noise samples
    relabelled = (poisoned_labels != labels).nonzero().flatten()
    assert set(relabelled.tolist()) <= set(indices.tolist())


def test_attack_config_round_trip_and_refusal_of_foreign_classes():
    attack = WaNet(target=4, s=0.7, seed=3)
    rebuilt = attack_from_config(attack.config())
    assert isinstance(rebuilt, WaNet) and rebuilt.config() == attack.config()
    images = batch(4)
    assert torch.equal(rebuilt.apply(images), attack.apply(images))
    with pytest.raises(ValueError, match="Unknown attack"):
        attack_from_config({"class_path": "os.system", "init_args": {}})


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5])
def test_poison_rate_outside_the_unit_interval_is_refused(rate):
    with pytest.raises(ValueError, match=r"poison_rate must be in \(0, 1\]"):
        BadNets(poison_rate=rate)


def test_trigger_larger_than_the_image_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        BadNets(patch_size=40).apply(batch(2))
    with pytest.raises(ValueError, match="does not fit"):
        BadNets(patch_size=3, position=(30, 0)).poison_test_set(to_uint8(batch(2)), torch.tensor([1, 2]), 10)


def test_target_outside_the_classes_is_refused():
    with pytest.raises(ValueError, match="target 12"):
        BadNets(target=12).poison_test_set(to_uint8(batch(2)), torch.tensor([1, 2]), 10)


def test_uint8_round_trip():
    images = to_uint8(batch(2))
    assert torch.equal(to_uint8(to_float(images)), images)
