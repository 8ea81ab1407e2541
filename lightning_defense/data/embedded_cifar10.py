"""The CIFAR-10 subset shipped inside the package: runs need no download and no data folder.

10,000 training images (1,000 per class) and 2,000 test images (200 per class), kept as the
original JPEG bytes of the shared CIFAR-10 archive; ``tools/make_embedded_subset.py`` made it.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor
from torchvision.io import decode_jpeg

from lightning_defense.data.datamodules import BackdoorDataModule
from lightning_defense.errors import ConfigurationError, InputNotFoundError

EMBEDDED_FILE = Path(__file__).parent / "embedded" / "cifar10_subset.safetensors"


@cache
def load_embedded_cifar10(split: str) -> tuple[Tensor, Tensor]:
    """Decode one split of the embedded subset: uint8 NCHW images and labels."""
    if split not in ("train", "test"):
        raise ConfigurationError(f"The embedded subset has splits 'train' and 'test', not {split!r}.")
    if not EMBEDDED_FILE.is_file():
        raise InputNotFoundError(
            f"The embedded CIFAR-10 subset {EMBEDDED_FILE} is missing: reinstall the package, or rebuild it "
            "with `python tools/make_embedded_subset.py <cifar10-jpeg folder>`."
        )
    tensors = load_file(str(EMBEDDED_FILE))
    blob, offsets = tensors[f"{split}_jpeg"], tensors[f"{split}_offsets"].tolist()
    images = decode_jpeg([blob[a:b] for a, b in zip(offsets[:-1], offsets[1:])])
    return torch.stack(images), tensors[f"{split}_labels"]


class EmbeddedCIFAR10DataModule(BackdoorDataModule):
    """The shipped CIFAR-10 subset (see module docstring) as a DataModule.

    Its training part is the defender's data in the embedded default; it can also train a small
    victim for a demonstration (``configs/victims/embedded_badnets.yaml``).
    """

    num_classes = 10

    def load_train(self) -> tuple[Tensor, Tensor]:
        return load_embedded_cifar10("train")

    def load_test(self) -> tuple[Tensor, Tensor]:
        return load_embedded_cifar10("test")
