"""Classifiers, victim files and the victim trainer."""

from typing import TYPE_CHECKING

from lightning_defense.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_defense.victims.architectures import ARCHITECTURES, allow_network, build_network
    from lightning_defense.victims.classifier import CIFAR10_MEAN, CIFAR10_STD, Classifier
    from lightning_defense.victims.victim_file import (
        UntrustedCheckpointError,
        VictimMetadata,
        load_victim,
        read_victim_metadata,
        save_repaired_victim,
        save_victim,
    )

__all__ = [
    "ARCHITECTURES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "Classifier",
    "UntrustedCheckpointError",
    "VictimMetadata",
    "allow_network",
    "build_network",
    "load_victim",
    "read_victim_metadata",
    "save_repaired_victim",
    "save_victim",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
