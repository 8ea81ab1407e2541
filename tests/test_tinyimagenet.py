"""Tiny-ImageNet from its published zip layout and from ImageFolder (issue 28, part 4), on a small
fixture made here: the same images and labels either way, class subsets in wnid order."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_image_folder
from torchvision.io import write_jpeg

from lightning_defense.data import TinyImageNetDataModule
from lightning_defense.errors import ConfigurationError, InputNotFoundError

WNIDS = ["n03000000", "n01000000", "n02000000"]  # not in sorted order on purpose


def image_folder_layout(root: Path) -> Path:
    write_image_folder(root / "train", WNIDS, 4, size=64)
    write_image_folder(root / "val", WNIDS, 2, size=64, seed=1)
    gray = torch.full((1, 64, 64), 200, dtype=torch.uint8)  # Tiny-ImageNet has grayscale JPEGs
    write_jpeg(gray, str(root / "train" / WNIDS[0] / "gray.jpg"))
    return root


def published_layout(folder: Path, root: Path) -> Path:
    """The same images as tiny-imagenet-200.zip lays them out."""
    for wnid in WNIDS:
        (root / "train" / wnid / "images").mkdir(parents=True)
        for image in sorted((folder / "train" / wnid).iterdir()):
            shutil.copy(image, root / "train" / wnid / "images" / image.name)
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for wnid in WNIDS:
        for image in sorted((folder / "val" / wnid).iterdir()):
            name = f"val_{wnid}_{image.name}"
            shutil.copy(image, root / "val" / "images" / name)
            lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(reversed(lines)) + "\n")
    return root


def test_both_layouts_give_the_same_images_and_labels_in_wnid_order(tmp_path):
    folder = image_folder_layout(tmp_path / "folder")
    published = published_layout(folder, tmp_path / "published")
    loaded = {}
    for name, root in (("folder", folder), ("published", published)):
        data = TinyImageNetDataModule(root=str(root))
        loaded[name] = (*data.load_train(), *data.load_test())
        assert data.classes == sorted(WNIDS) and data.num_classes == 3
    for a, b in zip(loaded["folder"], loaded["published"], strict=True):
        assert torch.equal(a, b)
    train_images, train_labels, test_images, test_labels = loaded["published"]
    assert train_images.shape == (13, 3, 64, 64) and test_images.shape == (6, 3, 64, 64)  # gray made RGB
    # write_image_folder brightens each wnid by its place in WNIDS: labels follow the sorted wnids
    means = torch.stack([test_images[test_labels == k].float().mean() for k in range(3)])
    assert means.argsort().tolist() == sorted(range(3), key=lambda k: WNIDS.index(sorted(WNIDS)[k]))
    assert torch.bincount(test_labels).tolist() == [2, 2, 2]


def test_a_class_subset_takes_the_first_wnids_and_serves_a_reserved_split(tmp_path):
    root = published_layout(image_folder_layout(tmp_path / "folder"), tmp_path / "published")
    data = TinyImageNetDataModule(root=str(root), num_classes=2, reserved_fraction=0.25, batch_size=4)
    data.setup("fit")
    assert data.classes == sorted(WNIDS)[:2] and data.num_classes == 2
    assert set(data.load_test()[1].tolist()) == {0, 1}
    assert len(data.reserved_images) == 2  # one image of each of the two classes' four
    with pytest.raises(ConfigurationError, match="has 3 classes, not 5"):
        TinyImageNetDataModule(root=str(root), num_classes=5).load_train()


def test_a_missing_folder_names_both_layouts_and_the_archive(tmp_path):
    with pytest.raises(InputNotFoundError, match="images/\\*.JPEG.*tinyimagenet64-100.tar.gz"):
        TinyImageNetDataModule(root=str(tmp_path / "nowhere")).load_train()
