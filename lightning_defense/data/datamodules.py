"""DataModules for victims: clean or poisoned training data, clean and poisoned test data.

Every DataModule here decodes its images once into uint8 memory, can hold out a seeded per-class
*reserved* split that the victim never sees (later handed to defenses as auxiliary data), and,
given an :class:`~lightning_defense.attacks.Attack`, poisons its training set and builds the
poisoned test set for the attack success rate. Validation and test loaders are
``[clean, poisoned]``; the poisoned one exists only with an attack.

Its length: the base classes and one short subclass per data set, together so that the data
sets can be compared at a glance.
"""

from __future__ import annotations

import csv
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from lightning_defense.attacks import Attack
from lightning_defense.data.augmentation import CropFlip
from lightning_defense.data.datasets import (
    IMAGE_SUFFIXES,
    ImageTensorDataset,
    collate,
    data_home,
    decode_files,
    load_image_folder,
    per_class_split,
)
from lightning_defense.errors import ConfigurationError, InputNotFoundError, check_image_size

T = TypeVar("T")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def served_image_size(datamodule: object) -> tuple[int, int] | None:
    """The size of the images a DataModule serves (a DefenseDataModule: its source's), if it says."""
    size = getattr(datamodule, "image_size", None) or getattr(getattr(datamodule, "source", None), "image_size", None)
    return tuple(size) if size is not None else None


class InMemoryDataModule(LightningDataModule):
    """Loaders over in-memory sets. Evaluation loaders are ``[clean test, poisoned test]``
    (see :mod:`lightning_defense.metrics`); the poisoned one exists only with an attack."""

    def __init__(self, batch_size: int, num_workers: int) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"data.init_args.batch_size must be a positive integer, got {batch_size!r}.")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigurationError(
                f"data.init_args.num_workers must be 0 (load in the main process) or more, got {num_workers!r}."
            )
        self.batch_size = batch_size
        self.num_workers = num_workers

    def _set_test_sets(self, images: Tensor, labels: Tensor, attack: Attack | None, num_classes: int) -> None:
        self.test_set = ImageTensorDataset(images, labels)
        self.poisoned_test_set = None
        if attack is not None:
            poisoned, attacker_labels = attack.poison_test_set(images, labels, num_classes)
            true_labels = labels[attack.poisoned_test_images(labels)]
            self.poisoned_test_set = ImageTensorDataset(poisoned, attacker_labels, true_labels=true_labels)

    def _loader(self, dataset: ImageTensorDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
        )

    def _eval_loaders(self) -> list[DataLoader]:
        sets = [self.test_set] + ([self.poisoned_test_set] if self.poisoned_test_set is not None else [])
        return [self._loader(s, shuffle=False) for s in sets]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class BackdoorDataModule(InMemoryDataModule):
    """Base class: subclasses say how to load the raw train and test images.

    Args:
        batch_size: per-process batch size.
        num_workers: DataLoader workers; 0 is fastest for in-memory data on few cores.
        attack: poisons the training set and yields the poisoned test set; ``None`` for clean data.
        reserved_fraction: per-class share of the training set held out from the victim.
        seed: draws the reserved split (a defense using the same seed gets the same split).
        augment: random crop (padding 4) and horizontal flip on training images.
        test_fraction: per-class share of the test set that validation and test use, drawn with
            ``seed``: an evaluation budget for slow test-time defenses (BDMAE queries the victim
            dozens of times an image; 0.1 is 1,000 CIFAR-10 test images). 1.0: all of it.
    """

    num_classes: int
    image_size: tuple[int, int] = (32, 32)

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        attack: Attack | None = None,
        reserved_fraction: float = 0.05,
        seed: int = 0,
        augment: bool = True,
        test_fraction: float = 1.0,
    ) -> None:
        if not 0 < test_fraction <= 1:
            raise ConfigurationError(
                f"test_fraction must be in (0, 1], got {test_fraction}: 1.0 evaluates the whole test set."
            )
        if not 0 <= reserved_fraction < 1:
            raise ConfigurationError(
                f"reserved_fraction must be in [0, 1), got {reserved_fraction}: it is the share of each class held "
                "out from the victim (0.05 by default)."
            )
        super().__init__(batch_size, num_workers)
        self.test_fraction = test_fraction
        self.attack = attack
        self.reserved_fraction = reserved_fraction
        self.seed = seed
        self.augment = augment
        self._prepared = False

    @abstractmethod
    def load_train(self) -> tuple[Tensor, Tensor]:
        """All training images (uint8 NCHW) and labels."""

    @abstractmethod
    def load_test(self) -> tuple[Tensor, Tensor]:
        """Test images (uint8 NCHW) and labels."""

    def train_transform(self) -> v2.Transform | None:
        if not self.augment:
            return None
        return CropFlip()

    def _check_labels(self, labels: Tensor, what: str) -> None:
        if len(labels) and int(labels.max()) >= self.num_classes:
            raise ConfigurationError(
                f"{type(self).__name__} {what} data has label {int(labels.max())}, but the module "
                f"declares {self.num_classes} classes; fix num_classes or the data."
            )

    def setup(self, stage: str | None = None) -> None:
        if self._prepared:
            return
        images, labels = self.load_train()
        self._check_labels(labels, "training")
        victim_part, reserved = per_class_split(labels, self.reserved_fraction, self.seed)
        self.reserved_images, self.reserved_labels = images[reserved], labels[reserved]
        train_images, train_labels = images[victim_part], labels[victim_part]
        self.poisoned_indices = torch.empty(0, dtype=torch.long)
        if self.attack is not None:
            self.attack.check_training_data(self.data_config())
            train_images, train_labels, self.poisoned_indices = self.attack.poison_training_set(
                train_images, train_labels, self.num_classes
            )
        transforms = [self.train_transform(), self.attack.training_transform() if self.attack else None]
        transforms = [t for t in transforms if t is not None]
        transform = v2.Compose(transforms) if len(transforms) > 1 else next(iter(transforms), None)
        self.train_set = ImageTensorDataset(train_images, train_labels, transform)
        test_images, test_labels = self.load_test()
        self._check_labels(test_labels, "test")
        if self.test_fraction < 1:
            _, subset = per_class_split(test_labels, self.test_fraction, self.seed)
            test_images, test_labels = test_images[subset], test_labels[subset]
        self._set_test_sets(test_images, test_labels, self.attack, self.num_classes)
        self._prepared = True

    def reserved_set(self) -> ImageTensorDataset:
        """The clean, labelled reserved split the victim never trained on."""
        self.setup()
        return ImageTensorDataset(self.reserved_images, self.reserved_labels)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def data_config(self) -> dict:
        """What a victim file records about its data, so defenses can rebuild the same split."""
        return {
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "num_classes": self.num_classes,
            "reserved_fraction": self.reserved_fraction,
            "seed": self.seed,
            "image_size": list(self.image_size),
        }


def _missing_root(name: str, root: Path, layout: str, how: str) -> InputNotFoundError:
    return InputNotFoundError(
        f"{name} not found under {root}: expected {layout}. {how} Set `data.init_args.root` in the "
        f"config (or $LIGHTNING_DEFENSE_DATA for the default location {data_home()})."
    )


def _download(name: str, root: Path, build: Callable[[], T], manual: str) -> T:
    """A torchvision data set built with ``download=True``: offline or refused, one error that names
    the layout to put in place by hand."""
    try:
        return build()
    except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision's md5 check raises RuntimeError
        raise InputNotFoundError(
            f"{name} could not be downloaded into {root} ({err}). Without internet, put the files in place by "
            f"hand: {manual} Then run again with `download: false`."
        ) from err


class _CIFARDataModule(BackdoorDataModule):
    """CIFAR in torchvision's format (``root/<batches folder>``, downloadable) or an ImageFolder
    tree (``root/{train,test}/<class>/*``, the layout of the shared JPEG archive)."""

    name: str
    default_root: str
    #: torchvision's folder of pickled batches inside ``root``
    batches_folder: str
    #: class names in label order (an ImageFolder tree is read in this order)
    classes: tuple[str, ...] | None
    how_to_get: str

    def __init__(self, root: str | None = None, download: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser() if root else data_home() / self.default_root
        self.download = download

    @staticmethod
    @abstractmethod
    def _torchvision_class() -> type:
        """torchvision's data set class, imported when first needed."""

    def _torchvision(self, train: bool) -> tuple[Tensor, Tensor] | None:
        if not (self.download or (self.root / self.batches_folder).is_dir()):
            return None
        dataset_class = self._torchvision_class()
        dataset = _download(
            self.name,
            self.root,
            lambda: dataset_class(str(self.root), train=train, download=self.download),
            f"the official python archive unpacked so that {self.root / self.batches_folder} exists, or "
            f"{self.root}/train/<class>/*.png and test/<class>/*.png (ImageFolder).",
        )
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(dataset.targets)

    def _load(self, split: str) -> tuple[Tensor, Tensor]:
        if (self.root / split).is_dir():
            images, labels, _ = load_image_folder(self.root / split, self.classes)
            return images, labels
        loaded = self._torchvision(train=split == "train")
        if loaded is None:
            raise _missing_root(
                self.name,
                self.root,
                f"train/<class>/*.jpg and test/<class>/*.jpg (ImageFolder) or {self.batches_folder}/",
                f"Online, set `download: true`. {self.how_to_get}",
            )
        return loaded

    def load_train(self) -> tuple[Tensor, Tensor]:
        return self._load("train")

    def load_test(self) -> tuple[Tensor, Tensor]:
        return self._load("test")


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 from torchvision's format (``root/cifar-10-batches-py``, downloadable) or an
    ImageFolder tree (``root/{train,test}/<class>/*``, the layout of the shared JPEG archive).

    Args:
        root: data folder; default ``<data home>/cifar10-jpeg``.
        download: let torchvision download CIFAR-10 into ``root`` when it is missing (online only).
    """

    name = "CIFAR-10"
    default_root = "cifar10-jpeg"
    batches_folder = "cifar-10-batches-py"
    classes = CIFAR10_CLASSES
    num_classes = 10

    @property
    def how_to_get(self) -> str:
        return (
            "Here, unpack the shared archive: "
            f"`mkdir -p {self.root.parent} && tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C {self.root.parent}`."
        )

    @staticmethod
    def _torchvision_class() -> type:
        from torchvision.datasets import CIFAR10

        return CIFAR10


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (100 fine classes) from torchvision's format (``root/cifar-100-python``,
    downloadable) or an ImageFolder tree (``root/{train,test}/<class>/*``, class folders named by
    the fine labels, which torchvision orders alphabetically as an ImageFolder does).

    Args:
        root: data folder; default ``<data home>/cifar100``.
        download: let torchvision download CIFAR-100 into ``root`` when it is missing (online only).
    """

    name = "CIFAR-100"
    default_root = "cifar100"
    batches_folder = "cifar-100-python"
    classes = None
    num_classes = 100
    how_to_get = "Offline, unpack cifar-100-python.tar.gz (from the CIFAR page) into root."

    @staticmethod
    def _torchvision_class() -> type:
        from torchvision.datasets import CIFAR100

        return CIFAR100


class ImageFolderDataModule(BackdoorDataModule):
    """Any data set in ImageFolder layout: ``root/<train_split>/<class>/*`` and
    ``root/<test_split>/<class>/*``, images resized to ``image_size`` when they differ."""

    name = "Image folder"
    default_root = "images"
    how_to_get = ""

    def __init__(
        self,
        root: str | None = None,
        num_classes: int | None = None,
        train_split: str = "train",
        test_split: str = "test",
        image_size: tuple[int, int] = (32, 32),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser() if root else data_home() / self.default_root
        self.train_split, self.test_split = train_split, test_split
        self.image_size = check_image_size(image_size)
        self.classes: list[str] | None = None
        if num_classes is not None:
            self.num_classes = num_classes

    def _load(self, split: str) -> tuple[Tensor, Tensor]:
        if not (self.root / split).is_dir():
            raise _missing_root(self.name, self.root, f"{split}/<class>/<image> (ImageFolder layout)", self.how_to_get)
        images, labels, classes = load_image_folder(self.root / split, self.classes, self.image_size)
        if self.classes is None:
            self.classes = classes
            declared = getattr(self, "num_classes", None)
            if declared is not None and declared != len(classes):
                raise ConfigurationError(
                    f"{self.name} under {self.root} has {len(classes)} class folders but "
                    f"{declared} classes were asked for: fix num_classes or the data."
                )
            self.num_classes = len(classes)
        return images, labels

    def load_train(self) -> tuple[Tensor, Tensor]:
        return self._load(self.train_split)

    def load_test(self) -> tuple[Tensor, Tensor]:
        return self._load(self.test_split)


class TinyImageNetDataModule(BackdoorDataModule):
    """Tiny-ImageNet (64x64 ImageNet classes), the seeds' ImageNet subsets' stand-in on a CPU.

    Reads either layout: the published Tiny-ImageNet-200 zip (``train/<wnid>/images/*.JPEG``,
    ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt``) or ImageFolder
    (``train/<wnid>/*``, ``val/<wnid>/*``, as in the shared ``tinyimagenet64-100.tar.gz``). The
    validation images are the test set (Tiny-ImageNet's test labels are not published).

    Args:
        root: data folder; default ``<data home>/tinyimagenet64``.
        num_classes: use the first ``num_classes`` wnids in sorted order (all when ``None``):
            50 is this project's stand-in for the papers' ImageNet-50.
        image_size: images are resized to it when they differ (64x64 as published).
    """

    name = "Tiny-ImageNet"

    def __init__(
        self,
        root: str | None = None,
        num_classes: int | None = None,
        image_size: tuple[int, int] = (64, 64),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser() if root else data_home() / "tinyimagenet64"
        self.image_size = check_image_size(image_size)
        if num_classes is not None and num_classes < 2:
            raise ConfigurationError(f"num_classes must be at least 2, got {num_classes}.")
        self.requested_classes = num_classes
        self.classes: list[str] | None = None
        if num_classes is not None:
            self.num_classes = num_classes

    def _wnids(self) -> list[str]:
        if self.classes is None:
            train = self.root / "train"
            if not train.is_dir():
                raise _missing_root(
                    self.name,
                    self.root,
                    "train/<wnid>/images/*.JPEG and val/ (the published zip) or train/<wnid>/*, val/<wnid>/*",
                    "Unpack the published tiny-imagenet-200.zip, or the shared archive: "
                    f"`tar -xzf ../shared/data/tinyimagenet64-100.tar.gz -C {self.root.parent}`.",
                )
            found = sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))
            wanted = self.requested_classes or len(found)
            if wanted > len(found):
                raise ConfigurationError(f"{self.name} under {self.root} has {len(found)} classes, not {wanted}.")
            self.classes, self.num_classes = found[:wanted], wanted
        return self.classes

    def _published(self) -> bool:
        return (self.root / "val" / "val_annotations.txt").is_file()

    def load_train(self) -> tuple[Tensor, Tensor]:
        classes = self._wnids()
        if not self._published():
            return load_image_folder(self.root / "train", classes, self.image_size)[:2]
        files, labels = [], []
        for label, wnid in enumerate(classes):
            images = sorted(
                f for f in (self.root / "train" / wnid / "images").glob("*") if f.suffix.lower() in IMAGE_SUFFIXES
            )
            files += images
            labels += [label] * len(images)
        return decode_files(files, self.image_size, f"Decoding {self.root / 'train'}"), torch.tensor(labels)

    def load_test(self) -> tuple[Tensor, Tensor]:
        classes = self._wnids()
        if not self._published():
            return load_image_folder(self.root / "val", classes, self.image_size)[:2]
        index = {wnid: label for label, wnid in enumerate(classes)}
        annotated = []
        for line in (self.root / "val" / "val_annotations.txt").read_text().splitlines():
            fields = line.split("\t")
            if len(fields) >= 2 and fields[1] in index:
                annotated.append((fields[0], index[fields[1]]))
        annotated.sort()
        files = [self.root / "val" / "images" / name for name, _ in annotated]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise InputNotFoundError(
                f"val_annotations.txt names {len(missing)} images that are missing, e.g. {missing[0]}."
            )
        images = decode_files(files, self.image_size, f"Decoding {self.root / 'val'}")
        return images, torch.tensor([label for _, label in annotated])


class GTSRBDataModule(ImageFolderDataModule):
    """GTSRB (43 traffic-sign classes), images resized to 32x32, from an ImageFolder tree
    (``root/{train,test}/<class>``, class folders ``00000``..``00042``: the shared archive) or
    torchvision's layout of the official archives (``root/gtsrb/GTSRB/...``, downloadable).
    No horizontal flip: it changes the meaning of signs.

    Args:
        download: let torchvision download the official archives into ``root`` (online only).
    """

    name = "GTSRB"
    default_root = "gtsrb32"
    num_classes = 43
    how_to_get = (
        "Online, set `download: true`. Here, unpack the shared archive: `tar -xzf ../shared/data/gtsrb32-jpeg.tar.gz "
        "-C <data home>`, or arrange the official images by ClassId into train/ and test/."
    )

    def __init__(self, root: str | None = None, download: bool = False, **kwargs) -> None:
        kwargs.setdefault("num_classes", 43)
        super().__init__(root, **kwargs)
        self.download = download

    def _load(self, split: str) -> tuple[Tensor, Tensor]:
        if (self.root / split).is_dir() or not (self.download or (self.root / "gtsrb").is_dir()):
            return super()._load(split)
        from torchvision.datasets import GTSRB
        from torchvision.datasets.folder import make_dataset

        official = "GTSRB-Training_fixed.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip"
        train = split == self.train_split
        _download(  # downloads and checks the archives; the files are read below, without PIL per item
            self.name,
            self.root,
            lambda: GTSRB(str(self.root), split="train" if train else "test", download=self.download),
            f"{official} unpacked into {self.root / 'gtsrb'} (GTSRB/Training/<class>/*.ppm, "
            "GTSRB/Final_Test/Images/*.ppm, GT-final_test.csv), or the ImageFolder layout train/<class>/, "
            "test/<class>/.",
        )
        folder = self.root / "gtsrb" / "GTSRB" / ("Training" if train else "Final_Test/Images")
        if train:
            # the folder's name is the ClassId, also where a class folder is missing
            classes = {path.name: int(path.name) for path in folder.iterdir() if path.is_dir() and path.name.isdigit()}
            samples = make_dataset(str(folder), classes, extensions=(".ppm",))
        else:
            with open(self.root / "gtsrb" / "GT-final_test.csv") as table:
                samples = [
                    (str(folder / row["Filename"]), int(row["ClassId"]))
                    for row in csv.DictReader(table, delimiter=";", skipinitialspace=True)
                ]
        images = decode_files([Path(path) for path, _ in samples], self.image_size, f"Decoding GTSRB {split}")
        return images, torch.tensor([label for _, label in samples])

    def train_transform(self) -> v2.Transform | None:
        return CropFlip(flip=False) if self.augment else None


class CINIC10DataModule(ImageFolderDataModule):
    """CINIC-10 in its published layout: ``root/{train,valid,test}/<class>/*.png``.

    Args:
        use_valid_for_training: add the ``valid`` split to the training images (a common choice,
            since CINIC-10's valid and train splits come from the same sources).
    """

    name = "CINIC-10"
    default_root = "cinic10"
    how_to_get = (
        "Download CINIC-10 from its publishers and unpack it so that root/train, root/valid and root/test exist."
    )

    def __init__(self, root: str | None = None, use_valid_for_training: bool = False, **kwargs) -> None:
        kwargs.setdefault("num_classes", 10)
        super().__init__(root, **kwargs)
        self.use_valid_for_training = use_valid_for_training

    def load_train(self) -> tuple[Tensor, Tensor]:
        images, labels = self._load("train")
        if self.use_valid_for_training:
            valid_images, valid_labels = self._load("valid")
            images, labels = torch.cat([images, valid_images]), torch.cat([labels, valid_labels])
        return images, labels
