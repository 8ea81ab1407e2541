"""The defender's data: auxiliary images for training a defense, and the sets it is judged on.

An :class:`AuxiliaryData` picks the defender's images from a source DataModule (one class per
kind of data, so a config swaps kinds with one ``class_path``). :class:`DefenseDataModule`
serves them for training, with the source's clean test set and the poisoned test set of the
victim's own attack, read from the victim file, for BA and ASR.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from lightning_defense.attacks import Attack, attack_of_victim
from lightning_defense.data.augmentation import augment_each
from lightning_defense.data.datamodules import CIFAR10_CLASSES, BackdoorDataModule, InMemoryDataModule
from lightning_defense.data.datasets import ImageTensorDataset, data_home, load_image_folder
from lightning_defense.errors import ConfigurationError, InputNotFoundError
from lightning_defense.victims import Classifier
from lightning_defense.victims.victim_file import load_victim, read_victim_metadata


class AuxiliaryData(ABC):
    """A kind of defender data: chooses the defender's images, given the source DataModule and the
    victim (which labels data that has no labels of its own)."""

    @abstractmethod
    def select(self, source: BackdoorDataModule, victim: Classifier | None = None) -> tuple[Tensor, Tensor]:
        """The defender's images (uint8 NCHW) and their labels."""


def pseudo_labels(victim: Classifier | None, images: Tensor, what: str) -> Tensor:
    """The victim's answers as labels for ``what``, which has none of its own."""
    if victim is None:
        raise ConfigurationError(
            f"{what} has no labels of its own and is labelled by the victim's predictions: give the "
            "DefenseDataModule a `victim` file."
        )
    return victim.predict_labels(images)


class PooledData(AuxiliaryData):
    """Auxiliary data drawn from a pool of images: an equal-size, seeded subset per class.

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
    def pool(self, source: BackdoorDataModule) -> tuple[Tensor, Tensor | None]:
        """All candidate images (uint8 NCHW) and their labels, ``None`` where the pool has none
        (the victim's pseudo-labels then stand in, for sampling per class too)."""

    def select(self, source: BackdoorDataModule, victim: Classifier | None = None) -> tuple[Tensor, Tensor]:
        images, labels = self.pool(source)
        labelled_by = "labelled"
        if labels is None:
            labels = pseudo_labels(victim, images, type(self).__name__)
            labelled_by = "that the victim labels"
        if self.per_class is None and self.fraction is None:
            return images, labels
        generator = torch.Generator().manual_seed(self.seed)
        chosen = []
        for cls in range(source.num_classes):
            members = (labels == cls).nonzero().flatten()
            count = self.per_class or max(1, round(self.fraction * len(members)))
            if len(members) < count:
                raise ConfigurationError(
                    f"{type(self).__name__} has {len(members)} images {labelled_by} as class {cls} but "
                    f"{'per_class' if self.per_class else 'fraction'} asks for {count}: "
                    "lower it or use a larger source."
                )
            chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
        index = torch.cat(chosen).sort().values
        return images[index], labels[index]


class SeenData(PooledData):
    """Clean images from the victim's own training split (REFINE's threat model allows them)."""

    def pool(self, source: BackdoorDataModule) -> tuple[Tensor, Tensor]:
        if source.attack is not None:
            raise ConfigurationError(
                "The source DataModule of a defense must be clean (no `attack`): the victim's attack "
                "is read from the victim file and only poisons the test set."
            )
        return source.train_set.images, source.train_set.labels


class ReservedData(PooledData):
    """The per-class reserved split that the victim never trained on."""

    def pool(self, source: BackdoorDataModule) -> tuple[Tensor, Tensor]:
        if len(source.reserved_labels) == 0:
            raise ConfigurationError(
                "The source DataModule holds out no reserved split: set its reserved_fraction > 0 "
                "(the same value and seed the victim was trained with)."
            )
        return source.reserved_images, source.reserved_labels


class FolderData(PooledData):
    """Auxiliary images read from an ImageFolder tree, ``<root>/<split>/<class folder>/*``."""

    default_root = ""
    how_to_get = ""

    def __init__(self, root: str | None = None, split: str = "train", **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser() if root else data_home() / self.default_root
        self.split = split

    def folder(self) -> Path:
        folder = self.root / self.split
        if not folder.is_dir():
            raise InputNotFoundError(f"{type(self).__name__}: {folder} does not exist. {self.how_to_get}")
        return folder


class ExternalData(FolderData):
    """Natural images from another source, in ImageFolder layout (``root/<split>/<folder>/*``), e.g.
    the shared Tiny-ImageNet excerpt. Its folders are not the victim's classes, so the images are
    labelled by the victim's predictions, and ``per_class`` counts those.

    Args:
        root: default ``<data home>/tinyimagenet32``.
        split: the sub-folder that holds the class folders.
    """

    default_root = "tinyimagenet32"
    how_to_get = (
        "Unpack the shared Tiny-ImageNet excerpt (`tar -xzf ../shared/data/tinyimagenet32-external.tar.gz "
        "-C <data home>`) or set `root` to any ImageFolder tree."
    )

    def pool(self, source: BackdoorDataModule) -> tuple[Tensor, None]:
        images, _, _ = load_image_folder(self.folder(), size=source.image_size)
        return images, None


class CINIC10ImageNetData(FolderData):
    """CINIC-10's ImageNet-derived images (file names without ``cifar10``), labelled with
    CINIC-10's classes, which are CIFAR-10's: external data that keeps the victim's label space.

    Args:
        root: the CINIC-10 folder (``root/{train,valid,test}/<class>/*.png``); default
            ``<data home>/cinic10``.
        split: which split to draw from.
        per_class: default 1,000.
    """

    default_root = "cinic10"
    how_to_get = (
        "Download CINIC-10 from its publishers and set `root` to the folder that holds train/, valid/ and test/."
    )

    def __init__(self, root: str | None = None, split: str = "train", per_class: int | None = 1000, **kwargs) -> None:
        super().__init__(root, split, per_class=per_class, **kwargs)

    def pool(self, source: BackdoorDataModule) -> tuple[Tensor, Tensor]:
        images, labels, _ = load_image_folder(
            self.folder(), CIFAR10_CLASSES, source.image_size, keep=lambda file: "cifar10" not in file.name
        )
        return images, labels


class ShiftedData(AuxiliaryData):
    """Another kind of auxiliary data through a fixed distribution shift: ``shift`` (any
    torchvision v2 transform, e.g. ``ColorJitter(brightness=0.5)``, ``GaussianBlur(3, (0.1, 2))``,
    ``GaussianNoise(sigma=0.1)``, ``RandomRotation(30)``) applied once to every image with its own
    random draw, seeded, so every run sees the same shifted set.

    Args:
        shift: the transform; it sees float images in [0, 1] and its output is clamped to [0, 1]
            and stored as uint8 like every image set.
        base: the images to shift; default :class:`ReservedData` (all of it).
        seed: seeds the shift's random draws.
    """

    def __init__(self, shift: v2.Transform, base: AuxiliaryData | None = None, seed: int = 0) -> None:
        self.shift = shift
        self.base = base if base is not None else ReservedData()
        self.seed = seed

    def select(self, source: BackdoorDataModule, victim: Classifier | None = None) -> tuple[Tensor, Tensor]:
        images, labels = self.base.select(source, victim)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed)  # the CPU's only: CUDA streams stay the run's
            shifted = augment_each(self.shift, images.float().div(255))
        return shifted.clamp(0, 1).mul(255).round().to(torch.uint8), labels


class UnlabeledData(AuxiliaryData):
    """Any auxiliary data with its labels dropped: the victim's pseudo-labels replace them, so a
    labelled defense (BTI-DBF, fine-tuning) runs in REFINE's unlabeled setting."""

    def __init__(self, base: AuxiliaryData) -> None:
        self.base = base

    def select(self, source: BackdoorDataModule, victim: Classifier | None = None) -> tuple[Tensor, Tensor]:
        images, _ = self.base.select(source, victim)
        return images, pseudo_labels(victim, images, f"UnlabeledData({type(self.base).__name__})")


class DefenseDataModule(InMemoryDataModule):
    """Training loader: the defender's auxiliary images, with labels (a defense that is
    unlabeled, like REFINE, ignores them). Evaluation loaders: ``[clean test, poisoned test]``.

    Args:
        source: a clean DataModule (no attack) that provides the images.
        aux_data: which of its images the defender has.
        victim: victim file whose stored attack builds the poisoned test set.
        attack: the attack to evaluate instead (when the victim file stores none).
        augmentation: a training augmentation of the auxiliary images (a v2 transform on uint8
            images, e.g. :class:`~lightning_defense.data.augmentation.CropFlip`), for defenses that
            train on the given labels (FT). ``None`` (the default) for the others: an augmentation
            can fire a backdoor by itself (RandomResizedCrop fires the WaNet victim's), so a defense
            that labels images with the victim, or votes on its answers, must see them as they are
            (REFINE augments T's inputs after labelling, see
            :class:`~lightning_defense.defenses.REFINE`; BTI-DBF's target vote must come from its
            generator).
    """

    def __init__(
        self,
        source: BackdoorDataModule,
        aux_data: AuxiliaryData,
        victim: str | None = None,
        attack: Attack | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        augmentation: v2.Transform | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.source = source
        self.aux_data = aux_data
        self.victim = victim
        self.attack = attack
        self.augmentation = augmentation
        self._prepared = False

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    def _victim_attack(self) -> Attack | None:
        if self.attack is not None or self.victim is None:
            return self.attack
        attack = attack_of_victim(self.victim)
        if attack is None:
            raise ConfigurationError(
                f"Victim {self.victim!r} records no attack, so the poisoned test set cannot be rebuilt: "
                "give the DefenseDataModule an `attack`."
            )
        return attack

    def _check_image_size(self) -> None:
        """A victim meets only images of the size it was trained on (its network would accept
        others and answer nonsense)."""
        metadata = read_victim_metadata(self.victim) if self.victim is not None else None
        trained = metadata.image_size() if metadata is not None else None
        if trained is not None and tuple(trained) != tuple(self.source.image_size):
            raise ConfigurationError(
                f"Victim {self.victim!r} was trained on {trained[0]}x{trained[1]} images but "
                f"{type(self.source).__name__} serves {self.source.image_size[0]}x{self.source.image_size[1]}: "
                "use the victim's data set, or set the source's image_size to match."
            )

    def train_transform(self) -> v2.Transform | None:
        return self.augmentation

    def setup(self, stage: str | None = None) -> None:
        if self._prepared:
            return
        self.source.setup(stage)
        self._check_image_size()
        victim = None
        if self.victim is not None:
            with torch.random.fork_rng(devices=[]):  # building the network draws weights: keep the run's stream
                victim = load_victim(self.victim, num_classes=self.num_classes)
        self.aux_set = ImageTensorDataset(*self.aux_data.select(self.source, victim), transform=self.train_transform())
        if len(self.aux_set) == 0:
            raise ConfigurationError(
                f"The auxiliary data ({type(self.aux_data).__name__}) holds no images: check its source, its "
                "folder and per_class/fraction."
            )
        self.attack = self._victim_attack()
        test = self.source.test_set
        self._set_test_sets(test.images, test.labels, self.attack, self.num_classes)
        self._prepared = True

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.aux_set, shuffle=True)
