from __future__ import annotations

import pytest
import torch
from torchvision.transforms import v2

from lightning_defense.attacks import BadNets
from lightning_defense.data import (
    Calibrated,
    CINIC10ImageNetData,
    DefenseDataModule,
    ExternalData,
    ProceduralData,
    ReservedData,
    SeenData,
    ShiftedData,
    SyntheticData,
    SyntheticDataModule,
    UnlabeledData,
    calibrate_inputs,
)
from lightning_defense.data.augmentation import RefineAugmentation
from lightning_defense.errors import ConfigurationError, InputNotFoundError
from lightning_defense.victims import Classifier, VictimMetadata, load_victim, save_victim


def source(**kwargs) -> SyntheticDataModule:
    return SyntheticDataModule(train_per_class=20, test_per_class=5, reserved_fraction=0.25, **kwargs)


def victim_file(tmp_path, attack=None) -> str:
    metadata = VictimMetadata("resnet20", 10, attack=attack.config() if attack else None)
    return str(save_victim(tmp_path / "victim.safetensors", Classifier("resnet20", 10), metadata))


def test_aux_kinds_draw_equal_per_class_subsets(tmp_path):
    victim = victim_file(tmp_path, BadNets(target=2))
    for aux, pool in ((SeenData(per_class=10), 15), (ReservedData(per_class=3), 5)):
        dm = DefenseDataModule(source(), aux, victim=victim, batch_size=8)
        dm.setup()
        assert dm.aux_set.labels.bincount().tolist() == [aux.per_class] * 10
        assert len(aux.pool(dm.source)[1]) == 10 * pool
    # the poisoned test set is the victim's own attack
    clean, poisoned = dm.val_dataloader()
    assert len(poisoned.dataset) == 45 and poisoned.dataset.labels.eq(2).all()
    assert len(clean.dataset) == 50


def test_a_fraction_draws_that_share_of_every_class_seeded():
    dm = DefenseDataModule(source(), SeenData(fraction=0.2, seed=3), attack=BadNets())
    dm.setup()
    assert dm.aux_set.labels.bincount().tolist() == [3] * 10  # 20% of the 15 seen images per class
    again = DefenseDataModule(source(), SeenData(fraction=0.2, seed=3), attack=BadNets())
    again.setup()
    other = DefenseDataModule(source(), SeenData(fraction=0.2, seed=4), attack=BadNets())
    other.setup()
    assert torch.equal(dm.aux_set.images, again.aux_set.images)
    assert not torch.equal(dm.aux_set.images, other.aux_set.images)
    with pytest.raises(ConfigurationError, match="not both"):
        SeenData(per_class=2, fraction=0.1)


def test_reserved_aux_never_overlaps_what_the_victim_saw():
    dm = DefenseDataModule(source(), ReservedData(), attack=BadNets())
    dm.setup()
    seen = {tuple(x.flatten()[:48].tolist()) for x in dm.source.train_set.images}
    assert not seen & {tuple(x.flatten()[:48].tolist()) for x in dm.aux_set.images}


def test_asking_for_more_than_a_source_holds_fails_clearly():
    dm = DefenseDataModule(source(), ReservedData(per_class=6), attack=BadNets())
    with pytest.raises(ConfigurationError, match="has 5 images labelled as class 0 but per_class asks for 6"):
        dm.setup()


def test_a_poisoned_source_is_refused_and_a_victim_without_attack_needs_one(tmp_path):
    with pytest.raises(ConfigurationError, match="must be clean"):
        DefenseDataModule(source(attack=BadNets()), SeenData(), attack=BadNets()).setup()
    with pytest.raises(ConfigurationError, match="records no attack"):
        DefenseDataModule(source(), SeenData(), victim=victim_file(tmp_path)).setup()


def test_refine_augmentation_serves_valid_images(tmp_path):
    dm = DefenseDataModule(source(), SeenData(), attack=BadNets(), batch_size=16, augmentation=RefineAugmentation())
    dm.setup()
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert not torch.equal(images, images[:, :1].expand_as(images))  # not all grayscale


def shifted(shift, seed=0):
    dm = DefenseDataModule(source(), ShiftedData(shift, seed=seed), attack=BadNets())
    dm.setup()
    return dm.source.reserved_images.float() / 255, dm.aux_set.images.float() / 255, dm


@pytest.mark.parametrize(
    "shift",
    [
        v2.ColorJitter(brightness=0.5),
        v2.ColorJitter(contrast=0.5),
        v2.GaussianBlur(3, sigma=(0.1, 2.0)),
        v2.GaussianNoise(sigma=0.1),
        v2.RandomRotation(30),
    ],
    ids=["brightness", "contrast", "blur", "noise", "rotation"],
)
def test_a_shift_changes_every_image_seeded_and_keeps_the_labels(shift):
    original, images, dm = shifted(shift)
    assert torch.equal(dm.aux_set.labels, dm.source.reserved_labels)
    changed = (images - original).abs().flatten(1).amax(dim=1)
    # a few draws are the identity after rounding to uint8 (blur sigma near 0.1, factor near 1)
    assert (changed > 0).float().mean() > 0.8
    served, _ = next(iter(dm.train_dataloader()))
    assert served.min() >= 0 and served.max() <= 1
    assert torch.equal(images, shifted(shift)[1])
    assert not torch.equal(images, shifted(shift, seed=1)[1])


def test_each_shift_does_what_it_says():
    original, brighter, _ = shifted(v2.ColorJitter(brightness=0.5))
    ratio = brighter.flatten(1).mean(1) / original.flatten(1).mean(1)
    assert ratio.min() > 0.45 and ratio.max() < 1.55 and ratio.std() > 0.1  # a factor in [0.5, 1.5] per image
    _, noisy, _ = shifted(v2.GaussianNoise(sigma=0.1))
    inside = (original > 0.3) & (original < 0.7)  # no clamping there
    assert abs((noisy - original)[inside].std().item() - 0.1) < 0.01
    _, blurred, _ = shifted(v2.GaussianBlur(3, sigma=(0.1, 2.0)))

    def roughness(x):
        return (x[..., 1:] - x[..., :-1]).abs().mean().item()

    assert roughness(blurred) < 0.9 * roughness(original)
    _, rotated, _ = shifted(v2.RandomRotation(30))
    corners = rotated[..., 0, 0]
    assert (corners == 0).float().mean() > 0.5  # rotation fills the uncovered corners black


def test_unlabeled_data_carries_the_victims_pseudo_labels(tmp_path):
    path = victim_file(tmp_path, BadNets())
    dm = DefenseDataModule(source(), UnlabeledData(ReservedData()), victim=path)
    dm.setup()
    expected = load_victim(path).predict_labels(dm.source.reserved_images)
    assert torch.equal(dm.aux_set.labels, expected)
    with pytest.raises(ConfigurationError, match="give the DefenseDataModule a `victim`"):
        DefenseDataModule(source(), UnlabeledData(ReservedData()), attack=BadNets()).setup()


class _CyclingVictim:
    """Labels image i as class i mod 10 (a victim whose answers the test knows)."""

    def predict_labels(self, images):
        return torch.arange(len(images)) % 10


def test_external_images_are_sampled_per_class_of_the_victims_labels(tmp_path, image_folder_writer):
    image_folder_writer(tmp_path / "external" / "train", ["n01", "n02", "n03"], per_class=40)
    pool = ExternalData(root=str(tmp_path / "external")).select(source(), _CyclingVictim())
    assert len(pool[0]) == 120 and pool[1].bincount().tolist() == [12] * 10
    drawn = ExternalData(root=str(tmp_path / "external"), per_class=5, seed=1)
    images, labels = drawn.select(source(), _CyclingVictim())
    assert labels.bincount().tolist() == [5] * 10
    assert torch.equal(labels, _CyclingVictim().predict_labels(pool[0])[_index_of(images, pool[0])])
    with pytest.raises(ConfigurationError, match="has 12 images that the victim labels as class 0 but per_class asks"):
        ExternalData(root=str(tmp_path / "external"), per_class=13).select(source(), _CyclingVictim())
    # through the data module, a real victim file labels them
    path = victim_file(tmp_path, BadNets())
    dm = DefenseDataModule(source(), ExternalData(root=str(tmp_path / "external")), victim=path)
    dm.setup()
    assert torch.equal(dm.aux_set.labels, load_victim(path).predict_labels(dm.aux_set.images))
    with pytest.raises(InputNotFoundError, match="tinyimagenet32-external.tar.gz"):
        DefenseDataModule(source(), ExternalData(root=str(tmp_path / "nowhere")), victim=path).setup()


def _index_of(chosen: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    flat = pool.flatten(1)
    return torch.stack([(flat == image.flatten()).all(1).nonzero()[0, 0] for image in chosen])


def test_cinic10_imagenet_part_leaves_out_the_cifar10_files(tmp_path):
    from torchvision.io import write_png

    from lightning_defense.data.datamodules import CIFAR10_CLASSES

    for label, name in enumerate(CIFAR10_CLASSES):
        folder = tmp_path / "cinic" / "train" / name
        folder.mkdir(parents=True)
        for i in range(3):
            write_png(torch.full((3, 32, 32), 200, dtype=torch.uint8), str(folder / f"cifar10-train-{i}.png"))
            write_png(torch.full((3, 32, 32), label, dtype=torch.uint8), str(folder / f"n0{label}_{i}.png"))
    aux = CINIC10ImageNetData(root=str(tmp_path / "cinic"), per_class=2)
    dm = DefenseDataModule(source(), aux, attack=BadNets())
    dm.setup()
    assert dm.aux_set.labels.bincount().tolist() == [2] * 10
    assert torch.equal(dm.aux_set.images[:, 0, 0, 0].long(), dm.aux_set.labels)  # only the ImageNet files
    with pytest.raises(ConfigurationError, match="has 3 images labelled as class 0"):
        DefenseDataModule(source(), CINIC10ImageNetData(root=str(tmp_path / "cinic")), attack=BadNets()).setup()


def test_guided_input_calibration_stays_in_its_bound_and_lowers_the_victims_loss():
    torch.manual_seed(0)
    victim = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).requires_grad_(False)
    images, labels = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    calibrated = calibrate_inputs(victim, images, labels, epsilon=0.05, lr=0.01, steps=10)
    assert (calibrated - images).abs().max() <= 0.05 + 1e-6
    assert calibrated.min() >= 0 and calibrated.max() <= 1
    loss = torch.nn.functional.cross_entropy
    assert loss(victim(calibrated), labels) < 0.9 * loss(victim(images), labels)
    # each image's result does not depend on the batch it was calibrated in
    alone = calibrate_inputs(victim, images[:4], labels[:4], epsilon=0.05, lr=0.01, steps=10)
    assert torch.allclose(alone, calibrated[:4], atol=1e-5)


def test_calibrated_data_is_computed_once_and_cached(tmp_path, monkeypatch):
    path = victim_file(tmp_path, BadNets())

    def calibrated(steps):
        return Calibrated(ReservedData(per_class=2), epsilon=0.1, steps=steps, cache_dir=str(tmp_path / "cache"))

    dm = DefenseDataModule(source(), calibrated(steps=3), victim=path)
    dm.setup()
    original = ReservedData(per_class=2).select(dm.source)[0]
    shift = (dm.aux_set.images.int() - original.int()).abs()
    assert shift.max() <= 26 and shift.max() > 0  # 0.1 of 255, rounded
    assert len(list((tmp_path / "cache").glob("gic_*.safetensors"))) == 1

    def fail(*args):
        raise AssertionError("calibrated again instead of reading the cache")

    monkeypatch.setattr(Calibrated, "calibrate", fail)
    again = DefenseDataModule(source(), calibrated(steps=3), victim=path)
    again.setup()
    assert torch.equal(again.aux_set.images, dm.aux_set.images)
    with pytest.raises(AssertionError, match="calibrated again"):  # other settings, other cache entry
        DefenseDataModule(source(), calibrated(steps=4), victim=path).setup()


def test_synthetic_data_samples_new_images_around_each_class_of_its_base():
    dm = DefenseDataModule(source(), SyntheticData(per_class=7, seed=1), attack=BadNets())
    dm.setup()
    images, labels = dm.aux_set.images.float(), dm.aux_set.labels
    assert labels.bincount().tolist() == [7] * 10
    base, base_labels = dm.source.reserved_images.float(), dm.source.reserved_labels
    means = torch.stack([base[base_labels == c].mean(0) for c in range(10)]).flatten(1)
    nearest_mean = torch.cdist(images.flatten(1), means).argmin(dim=1)
    assert (nearest_mean == labels).float().mean() > 0.9  # samples sit around their own class
    assert torch.cdist(images.flatten(1), base.flatten(1)).min() > 100  # and copy no base image (0-255 units)
    again = DefenseDataModule(source(), SyntheticData(per_class=7, seed=1), attack=BadNets())
    again.setup()
    assert torch.equal(again.aux_set.images, dm.aux_set.images)


def test_procedural_data_is_labelled_by_the_victim(tmp_path):
    path = victim_file(tmp_path, BadNets())
    dm = DefenseDataModule(source(), ProceduralData(count=50), victim=path)
    dm.setup()
    assert len(dm.aux_set) == 50
    assert torch.equal(dm.aux_set.labels, load_victim(path).predict_labels(dm.aux_set.images))


def test_setting_up_the_defenders_data_leaves_the_global_random_stream_alone(tmp_path):
    # a run's shuffling and augmentation draws must not depend on which aux kind it uses
    path = victim_file(tmp_path, BadNets())
    torch.manual_seed(0)
    expected = torch.rand(3)
    for aux in (SeenData(), UnlabeledData(ReservedData()), ShiftedData(v2.RandomRotation(30))):
        torch.manual_seed(0)
        DefenseDataModule(source(), aux, victim=path).setup()
        assert torch.equal(torch.rand(3), expected), type(aux).__name__


def test_a_victim_trained_on_another_image_size_is_refused(tmp_path):
    data = {"class_path": "x", "num_classes": 10, "reserved_fraction": 0.25, "seed": 0, "image_size": [64, 64]}
    metadata = VictimMetadata("resnet20", 10, attack=BadNets().config(), data=data)
    path = str(save_victim(tmp_path / "victim.safetensors", Classifier("resnet20", 10), metadata))
    with pytest.raises(ConfigurationError, match="trained on 64x64 images but SyntheticDataModule serves 32x32"):
        DefenseDataModule(source(), SeenData(), victim=path).setup()
    DefenseDataModule(source(image_size=(64, 64)), SeenData(), victim=path).setup()  # the matching size is fine
