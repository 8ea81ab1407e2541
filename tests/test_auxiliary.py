from __future__ import annotations

import pytest
import torch

from lightning_defense.attacks import BadNets
from lightning_defense.data import DefenseDataModule, ReservedData, SeenData, SyntheticDataModule
from lightning_defense.errors import ConfigurationError
from lightning_defense.victims import Classifier, VictimMetadata, save_victim


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
    with pytest.raises(ConfigurationError, match="has 5 images of class 0 but per_class asks for 6"):
        dm.setup()


def test_a_poisoned_source_is_refused_and_a_victim_without_attack_needs_one(tmp_path):
    with pytest.raises(ConfigurationError, match="must be clean"):
        DefenseDataModule(source(attack=BadNets()), SeenData(), attack=BadNets()).setup()
    with pytest.raises(ConfigurationError, match="records no attack"):
        DefenseDataModule(source(), SeenData(), victim=victim_file(tmp_path)).setup()


def test_refine_augmentation_serves_valid_images(tmp_path):
    dm = DefenseDataModule(source(), SeenData(), attack=BadNets(), batch_size=16, augment=True)
    dm.setup()
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert not torch.equal(images, images[:, :1].expand_as(images))  # not all grayscale
