"""The defender's data: auxiliary images for training a defense, and the sets it is judged on.

An :class:`AuxiliaryData` picks the defender's images from a source DataModule (one class per
kind of data, so a config swaps kinds with one ``class_path``). :class:`DefenseDataModule`
serves them for training, with the source's clean test set and the poisoned test set of the
victim's own attack, read from the victim file, for BA and ASR.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from lightning_defense.attacks import Attack, attack_from_config
from lightning_defense.data.augmentation import refine_augmentation
from lightning_defense.data.datamodules import BackdoorDataModule, InMemoryDataModule
from lightning_defense.data.datasets import ImageTensorDataset
from lightning_defense.errors import ConfigurationError
from lightning_defense.victims.victim_file import read_victim_metadata


class AuxiliaryData(ABC):
    """A kind of defender data, drawn from a source DataModule.

    Args:
        per_class: images per class (the same for every kind, so kinds compare at equal size);
            ``None`` takes the whole pool.
        fraction: instead of ``per_class``, this share of each class of the pool (rounded, at
            least one image), e.g. BTI-DBF's 5% of the training set.
        seed: draws the subset.
    """

    def __init__(self, per_class: int | None = None, fraction: float | None = None, seed: int = 0) -> None:
        if per_class is not None and per_class < 1:
            raise ConfigurationError(f"per_class must be >= 1, got {per_class}.")
        if fraction is not None and not 0 < fraction <= 1:
            raise ConfigurationError(f"fraction must be in (0, 1], got {fraction}.")
        if per_class is not None and fraction is not None:
            raise ConfigurationError("Give either per_class or fraction of the auxiliary data, not both.")
        self.per_class = per_class
        self.fraction = fraction
        self.seed = seed

    @abstractmethod
    def pool(self, source: BackdoorDataModule) -> tuple[Tensor, Tensor]:
        """All candidate images (uint8 NCHW) and their labels."""

    def select(self, source: BackdoorDataModule) -> tuple[Tensor, Tensor]:
        images, labels = self.pool(source)
        if self.per_class is None and self.fraction is None:
            return images, labels
        generator = torch.Generator().manual_seed(self.seed)
        chosen = []
        for cls in range(source.num_classes):
            members = (labels == cls).nonzero().flatten()
            count = self.per_class or max(1, round(self.fraction * len(members)))
            if len(members) < count:
                raise ConfigurationError(
                    f"{type(self).__name__} has {len(members)} images of class {cls} but per_class asks for "
                    f"{count}: lower per_class or use a larger source."
                )
            chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
        index = torch.cat(chosen).sort().values
        return images[index], labels[index]


class SeenData(AuxiliaryData):
    """Clean images from the victim's own training split (REFINE's threat model allows them)."""

    def pool(self, source: BackdoorDataModule) -> tuple[Tensor, Tensor]:
        if source.attack is not None:
            raise ConfigurationError(
                "The source DataModule of a defense must be clean (no `attack`): the victim's attack "
                "is read from the victim file and only poisons the test set."
            )
        return source.train_set.images, source.train_set.labels


class ReservedData(AuxiliaryData):
    """The per-class reserved split that the victim never trained on."""

    def pool(self, source: BackdoorDataModule) -> tuple[Tensor, Tensor]:
        if len(source.reserved_labels) == 0:
            raise ConfigurationError(
                "The source DataModule holds out no reserved split: set its reserved_fraction > 0 "
                "(the same value and seed the victim was trained with)."
            )
        return source.reserved_images, source.reserved_labels


class DefenseDataModule(InMemoryDataModule):
    """Training loader: the defender's auxiliary images, with labels (a defense that is
    unlabeled, like REFINE, ignores them). Evaluation loaders: ``[clean test, poisoned test]``.

    Args:
        source: a clean DataModule (no attack) that provides the images.
        aux_data: which of its images the defender has.
        victim: victim file whose stored attack builds the poisoned test set.
        attack: the attack to evaluate instead (when the victim file stores none).
        augment: augment the training images with REFINE's recipe (RandomResizedCrop at scale
            0.8 to 1, horizontal flip, RandomGrayscale p 0.2). Off by default: an augmentation can
            fire a backdoor by itself (RandomResizedCrop fires the WaNet victim's), so a defense
            that labels images with the victim, or votes on its answers, must see the images as
            they are (REFINE augments T's inputs after labelling, see
            :class:`~lightning_defense.defenses.REFINE`; BTI-DBF's target vote must come from its
            generator, so its configs do not augment).
    """

    def __init__(
        self,
        source: BackdoorDataModule,
        aux_data: AuxiliaryData,
        victim: str | None = None,
        attack: Attack | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        augment: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.source = source
        self.aux_data = aux_data
        self.victim = victim
        self.attack = attack
        self.augment = augment
        self._prepared = False

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    def _victim_attack(self) -> Attack | None:
        if self.attack is not None or self.victim is None:
            return self.attack
        metadata = read_victim_metadata(self.victim)
        if metadata is None or metadata.attack is None:
            raise ConfigurationError(
                f"Victim {self.victim!r} records no attack, so the poisoned test set cannot be rebuilt: "
                "give the DefenseDataModule an `attack`."
            )
        return attack_from_config(metadata.attack)

    def train_transform(self) -> v2.Transform | None:
        return refine_augmentation(self.source.image_size) if self.augment else None

    def setup(self, stage: str | None = None) -> None:
        if self._prepared:
            return
        self.source.setup(stage)
        self.aux_set = ImageTensorDataset(*self.aux_data.select(self.source), transform=self.train_transform())
        self.attack = self._victim_attack()
        test = self.source.test_set
        self._set_test_sets(test.images, test.labels, self.attack, self.num_classes)
        self._prepared = True

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.aux_set, shuffle=True)
