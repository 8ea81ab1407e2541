"""Poisoning attacks: a transform on [0, 1] batches plus the rule for poisoned labels.

An attack poisons a fixed, seeded share of a training set (the poisoned samples are chosen once,
as a real poisoned data set would be) and builds the poisoned test set used for the attack success
rate. Images are held as uint8 tensors; poisoning works on floats in [0, 1] and rounds back,
as a poisoned image file would be saved.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torchvision.transforms import v2

from lightning_defense.errors import ConfigurationError
from lightning_defense.io.safetensors_files import build_from_metadata
from lightning_defense.io.shipped import resolve
from lightning_defense.lazy import import_all
from lightning_defense.victims.victim_file import read_victim_metadata

LabelMode = Literal["all_to_one", "all_to_all"]


def scaled_side(side_at_32: int, height: int, width: int) -> int:
    """A trigger's side that keeps its share of the image: ``side_at_32`` pixels per 32 pixels of
    the shorter side (BadNets' 3 is 6 at 64 and 21 at 224, the seed papers' ImageNet patch)."""
    return max(1, round(side_at_32 * min(height, width) / 32))


def to_float(images: Tensor) -> Tensor:
    return images.float().div_(255)


def to_uint8(images: Tensor) -> Tensor:
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8)


class Attack(ABC):
    """Base class of all poisoning attacks.

    Args:
        target: the attacker's class (all-to-one); ignored by all-to-all, which maps y to y+1.
        poison_rate: share of the training set that is poisoned, in (0, 1].
        label_mode: ``all_to_one`` sends every poisoned image to ``target``; ``all_to_all``
            sends class y to (y + 1) mod K.
        seed: draws which samples are poisoned and any random part of the trigger.
    """

    def __init__(
        self,
        target: int = 0,
        poison_rate: float = 0.1,
        label_mode: LabelMode = "all_to_one",
        seed: int = 0,
    ) -> None:
        if not 0 < poison_rate <= 1:
            raise ConfigurationError(f"poison_rate must be in (0, 1], got {poison_rate}.")
        if label_mode not in ("all_to_one", "all_to_all"):
            raise ConfigurationError(f"label_mode must be 'all_to_one' or 'all_to_all', got {label_mode!r}.")
        if target < 0:
            raise ConfigurationError(f"target must be a class index >= 0, got {target}.")
        self.target = target
        self.poison_rate = poison_rate
        self.label_mode = label_mode
        self.seed = seed

    @abstractmethod
    def apply(self, images: Tensor) -> Tensor:
        """Poison a batch: float NCHW in [0, 1] in, same shape and range out."""

    # clean-label attacks poison target-class images only and never change a label
    clean_label: bool = False

    def locate_files(self, victim_file: str | Path) -> Attack:
        """This attack as rebuilt from ``victim_file``'s metadata, with any file it reads looked
        up beside the victim file when the recorded path is gone, so files copied together keep
        working. Most attacks read no file."""
        return self

    def check_training_data(self, data: dict[str, Any]) -> None:
        """Fail early when a file this attack reads to poison a training set was made for other
        data than ``data`` (what a victim file records: ``BackdoorDataModule.data_config()``).
        Most attacks read no file."""
        return None

    def training_transform(self) -> v2.Transform | None:
        """A transform of every training image (uint8), poisoned or not, drawn afresh every epoch,
        after the data's own augmentation: for attacks that control the training pipeline
        (PhysicalBA's physical-capture simulation). ``None`` for data-poisoning attacks."""
        return None

    def check(self, image_size: tuple[int, int], num_classes: int) -> None:
        """Fail early, naming the fix, when the attack cannot work on this data."""
        if self.clean_label and self.label_mode != "all_to_one":
            raise ConfigurationError(
                f"{type(self).__name__} is a clean-label attack: it poisons target-class images only, so "
                "label_mode must be all_to_one."
            )
        if self.label_mode == "all_to_one" and self.target >= num_classes:
            raise ConfigurationError(
                f"Attack target {self.target} is not a class of this data set "
                f"({num_classes} classes): choose a target in 0..{num_classes - 1}."
            )

    def poison_labels(self, labels: Tensor, num_classes: int) -> Tensor:
        if self.label_mode == "all_to_one":
            return torch.full_like(labels, self.target)
        return (labels + 1) % num_classes

    def _generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + offset)

    def _after_poisoned(self, total: int, poisoned: int, count: int) -> Tensor:
        """``count`` indices drawn right after the poisoned ones in the same seeded order: the extra
        samples some attacks add with their true labels (WaNet's noise, BppAttack's negatives)."""
        return torch.randperm(total, generator=self._generator())[poisoned : poisoned + count]

    def _apply_uint8(self, images: Tensor, chunk: int = 2048) -> Tensor:
        return torch.cat([to_uint8(self.apply(to_float(c))) for c in images.split(chunk)])

    def poison_training_set(self, images: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
        """Poisoned copy of a uint8 training set: images, labels and the poisoned indices.

        A dirty-label attack poisons ``poison_rate`` of the whole set and relabels it; a
        clean-label one (:attr:`clean_label`) poisons ``poison_rate`` of the target class's images
        and keeps their labels.
        """
        self.check(tuple(images.shape[-2:]), num_classes)
        candidates = (labels == self.target).nonzero().flatten() if self.clean_label else torch.arange(len(labels))
        order = candidates[torch.randperm(len(candidates), generator=self._generator())]
        poisoned = order[: round(self.poison_rate * len(candidates))].sort().values
        images, labels = images.clone(), labels.clone()
        if len(poisoned):
            images[poisoned] = self._apply_uint8(images[poisoned])
            if not self.clean_label:
                labels[poisoned] = self.poison_labels(labels[poisoned], num_classes)
        return images, labels, poisoned

    def poison_test_set(self, images: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
        """Every test image poisoned, labelled as the attacker wants.

        All-to-one leaves out images of the target class: they would count as successes
        without any backdoor (contract 4).
        """
        self.check(tuple(images.shape[-2:]), num_classes)
        keep = self.poisoned_test_images(labels)
        images, labels = images[keep], labels[keep]
        return self._apply_uint8(images), self.poison_labels(labels, num_classes)

    def poisoned_test_images(self, labels: Tensor) -> Tensor:
        """Which test images the poisoned test set holds (a mask): all-to-one leaves out the
        target class, whose images would count as successes without any backdoor."""
        if self.label_mode == "all_to_one":
            return labels != self.target
        return torch.ones_like(labels, dtype=torch.bool)

    def config(self) -> dict[str, Any]:
        """``class_path``/``init_args`` of this attack, as a config file would name it."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        cls = type(self)
        return {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": {name: getattr(self, name) for name in names},
        }


def attack_from_config(config: dict[str, Any]) -> Attack:
    """Rebuild an attack from :meth:`Attack.config`, e.g. one stored in a victim file.

    Only subclasses of :class:`Attack` defined in this package are accepted: the config may come
    from an untrusted file, and importing an arbitrary class path from it would run code.
    """
    import_all("lightning_defense.attacks")  # every attack, not only those imported so far

    def subclasses(cls: type) -> list[type]:
        return [cls, *[s for c in cls.__subclasses__() for s in subclasses(c)]]

    known = {f"{c.__module__}.{c.__qualname__}": c for c in subclasses(Attack) if not inspect.isabstract(c)}
    known |= {c.__qualname__: c for c in known.values()}
    class_path = config.get("class_path")
    # a class's public path, or its module's before it moved (a victim file keeps the path it was written with)
    if class_path not in known and str(class_path).startswith("lightning_defense.attacks."):
        class_path = str(class_path).rpartition(".")[2]
    if class_path not in known:
        raise ConfigurationError(
            f"Unknown attack {class_path!r}; known attacks: {', '.join(sorted(c for c in known if '.' not in c))}."
        )
    return build_from_metadata(known[class_path], config.get("init_args") or {}, "the attack config", "attack")


def attack_of_victim(victim_file: str | Path) -> Attack | None:
    """The attack a victim file records (``None`` if it records none), rebuilt with
    :func:`attack_from_config`, with the files it reads looked up beside the victim file when their
    recorded paths are gone (:meth:`Attack.locate_files`)."""
    metadata = read_victim_metadata(victim_file)
    if metadata is None or metadata.attack is None:
        return None
    return attack_from_config(metadata.attack).locate_files(resolve(victim_file))
