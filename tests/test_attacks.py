from __future__ import annotations

import math

import pytest
import torch

from lightning_defense.attacks import (
    BATT,
    SIG,
    BadNets,
    Blended,
    BppAttack,
    LabelConsistent,
    PhysicalBA,
    WaNet,
    attack_from_config,
)
from lightning_defense.attacks.base import to_float, to_uint8
from lightning_defense.data import SyntheticDataModule


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
    assert torch.equal(a.pattern(3), b.pattern(3))
    assert not torch.equal(a.pattern(3), BadNets(seed=2).pattern(3))
    out = a.apply(batch())
    assert torch.equal(out[:, :, :3, :3], a.pattern(3).expand(8, -1, -1, -1))


@pytest.mark.parametrize(("size", "side"), [(32, 3), (64, 6), (224, 21), (48, 4)])
def test_badnets_patch_scales_with_the_image_unless_given(size, side):
    images = torch.rand(2, 3, size, size)
    changed = (BadNets().apply(images) != images).any(dim=1)
    rows, cols = changed.any(dim=2).any(dim=0), changed.any(dim=1).any(dim=0)
    assert int(rows.sum()) == side and int(cols.sum()) == side  # a side x side square ...
    assert changed[:, -side:, -side:].float().mean() > 0.9  # ... in the bottom-right corner
    fixed = (BadNets(patch_size=3).apply(images) != images).any(dim=1)
    assert not fixed[:, : size - 3].any() and not fixed[:, :, : size - 3].any()


def test_scaled_badnets_at_32_is_the_recorded_3x3_patch():
    # victim files record `patch_size: 3`; the scaled default must poison CIFAR images identically
    images = batch()
    assert torch.equal(BadNets(seed=4).apply(images), BadNets(seed=4, patch_size=3).apply(images))


@pytest.mark.parametrize(("size", "side"), [(32, 3), (64, 6)])
def test_label_consistent_corner_squares_scale_with_the_image(size, side):
    images = torch.full((1, 3, size, size), 0.5)
    changed = (LabelConsistent().apply(images) != images).any(dim=1)[0]
    assert int(changed[:, :side].any(dim=1).sum()) == 2 * side  # top-left and bottom-left squares
    assert not changed[side:-side].any()


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


def test_batt_rotates_every_image_by_its_angle():
    images = torch.zeros(2, 3, 32, 32)
    images[:, :, 15:17, :] = 1.0  # a horizontal bar through the centre
    rotated = BATT(angle=90).apply(images)
    assert torch.equal(rotated, images.transpose(-1, -2).flip(-2))  # 90 degrees counter-clockwise
    tilted = BATT().apply(images)  # the seeds' 16 degrees
    left, right = tilted[0, 0, :, 2].nonzero().float().mean(), tilted[0, 0, :, 29].nonzero().float().mean()
    expected = 27 * math.tan(math.radians(16))  # rows the bar climbs between the two columns
    assert abs(float(left - right) - expected) < 1.5


def test_sig_adds_its_sinusoid_and_poisons_only_target_images_keeping_labels():
    attack = SIG(target=2, poison_rate=0.5, delta=20, frequency=6)
    flat = torch.full((1, 3, 32, 32), 0.5)
    added = (attack.apply(flat) - flat)[0, 0]
    assert torch.allclose(added, added[:1].expand(32, -1))  # the same along every row
    assert abs(float(added.max()) - 20 / 255) < 2e-3 and abs(float(added[0, 0])) < 1e-6
    period = 32 / 6
    assert torch.allclose(added[0, 8], 20 / 255 * torch.sin(torch.tensor(2 * math.pi * 8 / period)), atol=1e-6)
    images, labels = to_uint8(batch(100)), torch.arange(100) % 10
    poisoned_images, poisoned_labels, indices = attack.poison_training_set(images, labels, 10)
    assert torch.equal(poisoned_labels, labels)  # clean-label: no label changes
    assert (labels[indices] == 2).all() and len(indices) == 5  # half of the 10 target images
    assert torch.equal((poisoned_images != images).flatten(1).any(1).nonzero().flatten(), indices)
    with pytest.raises(ValueError, match="clean-label"):
        SIG(label_mode="all_to_all").poison_training_set(images, labels, 10)


def test_bpp_quantizes_to_its_levels_and_adds_negative_samples_with_true_labels():
    attack = BppAttack(levels=8, poison_rate=0.1, negative_ratio=0.2)
    quantized = attack.apply(batch())
    assert set(torch.unique(torch.round(quantized * 7)).tolist()) <= set(range(8))
    assert torch.allclose(quantized * 7, torch.round(quantized * 7), atol=1e-5)
    dithered = BppAttack(levels=8, dithering=True).apply(batch())
    assert torch.allclose(dithered * 7, torch.round(dithered * 7), atol=1e-5)
    smooth = torch.linspace(0, 1, 32).expand(1, 3, 32, 32)  # dithering keeps the mean level, rounding steps
    assert (BppAttack(levels=2, dithering=True).apply(smooth).mean(-2) - smooth.mean(-2)).abs().mean() < (
        BppAttack(levels=2).apply(smooth).mean(-2) - smooth.mean(-2)
    ).abs().mean()
    images, labels = to_uint8(batch(100)), torch.arange(100) % 10
    poisoned_images, poisoned_labels, indices = attack.poison_training_set(images, labels, 10)
    changed = (poisoned_images != images).flatten(1).any(1)
    relabelled = (poisoned_labels != labels).nonzero().flatten()
    assert set(relabelled.tolist()) <= set(indices.tolist()) and changed.sum() == 10 + 20


def test_physical_ba_poisons_like_badnets_and_transforms_every_training_image_each_epoch():
    images, labels = to_uint8(batch(100)), torch.arange(100) % 10
    physical, plain = PhysicalBA(poison_rate=0.2, seed=1), BadNets(poison_rate=0.2, seed=1)
    # the stored poisoned set is BadNets' (the patch): the physical transforms belong to the training pipeline
    poisoned = physical.poison_training_set(images, labels, 10)
    assert all(torch.equal(a, b) for a, b in zip(poisoned, plain.poison_training_set(images, labels, 10)))
    assert torch.equal(physical.poison_test_set(images, labels, 10)[0], plain.poison_test_set(images, labels, 10)[0])
    assert plain.training_transform() is None

    def two_reads(attack, seed: int = 0):
        data = SyntheticDataModule(
            train_per_class=10, test_per_class=1, reserved_fraction=0.0, augment=False, attack=attack
        )
        data.setup()
        clean = next(i for i in range(len(data.train_set)) if i not in set(data.poisoned_indices.tolist()))
        torch.manual_seed(seed)
        return data.train_set[clean][0], data.train_set[clean][0]

    first, second = two_reads(PhysicalBA(poison_rate=0.2))
    assert not torch.equal(first, second)  # a clean image too, and a new draw every read (epoch)
    assert torch.equal(two_reads(PhysicalBA(poison_rate=0.2))[0], first)  # from the global seed
    assert torch.equal(*two_reads(BadNets(poison_rate=0.2)))  # data poisoning alone adds no transform


@pytest.mark.parametrize("attack", [BATT(target=4), SIG(target=4), BppAttack(target=4), PhysicalBA(target=4)])
def test_new_attacks_round_trip_through_their_config(attack):
    rebuilt = attack_from_config(attack.config())
    assert type(rebuilt) is type(attack) and rebuilt.config() == attack.config()
