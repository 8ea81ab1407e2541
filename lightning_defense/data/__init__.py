"""DataModules and in-memory data sets (images are uint8 in memory, float [0, 1] when served)."""

from typing import TYPE_CHECKING

from lightning_defense.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_defense.data.augmentation import (
        CropFlip,
        ImageMixup,
        RandomNoiseBlend,
        RandomPatches,
        RefineAugmentation,
    )
    from lightning_defense.data.auxiliary import (
        AuxiliaryData,
        CINIC10ImageNetData,
        DefenseDataModule,
        ExternalData,
        PooledData,
        ReservedData,
        SeenData,
        ShiftedData,
        UnlabeledData,
    )
    from lightning_defense.data.calibration import Calibrated, calibrate_inputs
    from lightning_defense.data.datamodules import (
        BackdoorDataModule,
        CIFAR10DataModule,
        CIFAR100DataModule,
        CINIC10DataModule,
        GTSRBDataModule,
        ImageFolderDataModule,
        InMemoryDataModule,
        TinyImageNetDataModule,
    )
    from lightning_defense.data.datasets import ImageTensorDataset, data_home, load_image_folder, per_class_split
    from lightning_defense.data.embedded_cifar10 import EmbeddedCIFAR10DataModule, load_embedded_cifar10
    from lightning_defense.data.synthetic import ProceduralData, SyntheticData, SyntheticDataModule, procedural_images

__all__ = [
    "AuxiliaryData",
    "CINIC10ImageNetData",
    "Calibrated",
    "CropFlip",
    "ImageMixup",
    "RandomNoiseBlend",
    "RandomPatches",
    "RefineAugmentation",
    "DefenseDataModule",
    "ExternalData",
    "PooledData",
    "ProceduralData",
    "ReservedData",
    "SeenData",
    "ShiftedData",
    "SyntheticData",
    "UnlabeledData",
    "calibrate_inputs",
    "BackdoorDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CINIC10DataModule",
    "EmbeddedCIFAR10DataModule",
    "GTSRBDataModule",
    "ImageFolderDataModule",
    "TinyImageNetDataModule",
    "InMemoryDataModule",
    "ImageTensorDataset",
    "SyntheticDataModule",
    "data_home",
    "load_embedded_cifar10",
    "load_image_folder",
    "per_class_split",
    "procedural_images",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
