"""In-memory image sets: decoded once to uint8, served as float [0, 1] (contract 1)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from rich.progress import track
from torch import Tensor
from torch.utils.data import Dataset, default_collate
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

from lightning_defense.errors import ConfigurationError, DataError, InputNotFoundError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm")


def data_home() -> Path:
    """Where data sets live unless a config names a root: ``$LIGHTNING_DEFENSE_DATA`` or
    ``~/.cache/lightning_defense/data``."""
    return Path(os.environ.get("LIGHTNING_DEFENSE_DATA", "~/.cache/lightning_defense/data")).expanduser()


class ImageTensorDataset(Dataset):
    """Images held as one uint8 NCHW tensor; items are ``(float image in [0, 1], label)``, or
    ``(image, label, true label)`` when ``true_labels`` is given (a poisoned test set: ``labels``
    are the attacker's, ``true_labels`` the images' own classes, for the robust accuracy).

    ``transform`` runs on the uint8 image (torchvision transforms v2 work on tensors) before the
    conversion to float, so augmentation never sees values outside [0, 255].
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        transform: Callable[[Tensor], Tensor] | None = None,
        true_labels: Tensor | None = None,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ConfigurationError(f"images must be a uint8 NCHW tensor, got {images.dtype} {tuple(images.shape)}.")
        if len(images) != len(labels) or (true_labels is not None and len(true_labels) != len(images)):
            counts = f"{len(labels)} labels" + ("" if true_labels is None else f" and {len(true_labels)} true labels")
            raise ConfigurationError(f"{len(images)} images but {counts}.")
        self.images = images
        self.labels = labels.long()
        self.true_labels = None if true_labels is None else true_labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def _item(self, images: Tensor, index: int | Tensor) -> tuple[Tensor, ...]:
        images = images.float().div_(255)
        if self.true_labels is None:
            return images, self.labels[index]
        return images, self.labels[index], self.true_labels[index]

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return self._item(image, index)

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...]:
        """A whole batch at once: the DataLoader calls this instead of one ``__getitem__`` per image,
        so without a per-image transform there is no Python loop over the batch."""
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[index]
        if self.transform is not None:
            images = torch.stack([self.transform(image) for image in images])
        return self._item(images, index)


def collate(batch: tuple[Tensor, ...] | list) -> tuple[Tensor, ...]:
    """A DataLoader's ``collate_fn`` for :class:`ImageTensorDataset`: its batches come made; a
    list of items (a data set without ``__getitems__``, e.g. a ConcatDataset) is stacked."""
    return batch if isinstance(batch, tuple) else default_collate(batch)


def _decode(file: Path) -> Tensor:
    """uint8 RGB CHW; PIL for the formats torchvision's decoders lack (BMP, PPM)."""
    if file.suffix.lower() in (".bmp", ".ppm"):
        with Image.open(file) as image:
            return TF.pil_to_tensor(image.convert("RGB"))
    image = decode_image(str(file), mode=ImageReadMode.RGB)
    return TF.to_dtype(image, torch.uint8, scale=True) if image.dtype != torch.uint8 else image  # 16-bit PNGs


def _decode_reason(err: BaseException) -> str:
    reason = re.sub(r"^.*?\.cpp:\d+, ", "", str(err).splitlines()[0] if str(err) else type(err).__name__)
    return reason.split(". ")[0][:160]


def decode_files(files: Sequence[Path], size: tuple[int, int] | None = None, description: str = "Decoding") -> Tensor:
    """Decode image files to one uint8 NCHW tensor, resizing to ``size`` when they differ."""
    images = []
    for file in track(files, description=description, transient=True, disable=len(files) < 2000):
        try:
            image = _decode(file)
        # the decoders' messages do not name the file
        except (RuntimeError, OSError, Image.DecompressionBombError) as err:
            raise DataError(
                f"{file} is not a readable image ({_decode_reason(err)}). Remove it from the data "
                "folder or replace it with an intact copy."
            ) from err
        if size is not None and tuple(image.shape[-2:]) != tuple(size):
            image = TF.resize(image, list(size), antialias=True)
        images.append(image)
    if not images:
        return torch.empty(0, 3, *(size or (0, 0)), dtype=torch.uint8)
    shapes = {tuple(i.shape) for i in images}
    if len(shapes) > 1:
        raise ConfigurationError(f"Images differ in size ({sorted(shapes)[:3]}...): pass an image size to resize them.")
    return torch.stack(images)


def load_image_folder(
    root: Path,
    classes: Sequence[str] | None = None,
    size: tuple[int, int] | None = None,
    keep: Callable[[Path], bool] | None = None,
) -> tuple[Tensor, Tensor, list[str]]:
    """Decode an ImageFolder tree (``root/<class>/<image>``) into memory.

    Classes are sorted folder names, as torchvision's ``ImageFolder`` orders them, unless
    ``classes`` fixes the order (and then every one of them must be present). ``keep`` filters
    the image files.
    """
    if not root.is_dir():
        raise InputNotFoundError(f"{root} is not a folder.")
    # hidden folders (.ipynb_checkpoints, .git) are no classes
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
    missing = [c for c in classes if c not in found]
    if missing:
        raise InputNotFoundError(f"{root} lacks the class folders {missing[:5]}.")
    files, labels = [], []
    for label, name in enumerate(classes):
        images = [f for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES]
        batch = sorted(f for f in images if keep is None or keep(f))
        if not images:
            raise InputNotFoundError(
                f"{root / name} holds no images ({', '.join(IMAGE_SUFFIXES)}): a class without images cannot be "
                "learned or evaluated. Add its images or remove the folder."
            )
        files += batch
        labels += [label] * len(batch)
    if not files:
        raise InputNotFoundError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    images = decode_files(files, size, description=f"Decoding {root}")
    return images, torch.tensor(labels), list(classes)


def per_class_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded split that takes ``fraction`` of every class: (kept indices, held-out indices)."""
    if not 0 <= fraction < 1:
        raise ConfigurationError(f"The held-out fraction must be in [0, 1), got {fraction}.")
    generator = torch.Generator().manual_seed(seed)
    held = []
    for cls in labels.unique(sorted=True):
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        held.append(members[: round(fraction * len(members))])
    held_out = torch.cat(held).sort().values if held else torch.empty(0, dtype=torch.long)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_out] = False
    return mask.nonzero().flatten(), held_out
