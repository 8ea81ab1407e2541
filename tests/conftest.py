from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torchvision.io import write_jpeg, write_png


def write_image_folder(
    root: Path, classes: list[str], per_class: int, size: int = 32, suffix: str = ".jpg", seed: int = 0
) -> None:
    """An ImageFolder tree of small random images, each class with its own mean colour."""
    generator = torch.Generator().manual_seed(seed)
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = torch.randint(0, 64, (3, size, size), generator=generator, dtype=torch.uint8) + 16 * label
            if suffix == ".png":
                write_png(image, str(folder / f"{i:04d}.png"))
            else:
                write_jpeg(image, str(folder / f"{i:04d}.jpg"), quality=95)


@pytest.fixture(autouse=True)
def _keep_threads():
    """The CLI sets torch's threads and OMP_NUM_THREADS for its process: undo it after each test."""
    threads, variable = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    yield
    torch.set_num_threads(threads)
    if variable is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = variable


@pytest.fixture
def image_folder_writer():
    return write_image_folder


class RunsCode:
    """Pickles into a call that creates ``marker``: a checkpoint that runs code when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))
