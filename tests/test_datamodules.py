from __future__ import annotations

import pytest
import torch

from lightning_defense.attacks import BadNets
from lightning_defense.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CINIC10DataModule,
    DefenseDataModule,
    EmbeddedCIFAR10DataModule,
    GTSRBDataModule,
    ImageFolderDataModule,
    ReservedData,
    SyntheticDataModule,
    per_class_split,
)
from lightning_defense.data.datamodules import CIFAR10_CLASSES
from lightning_defense.data.datasets import ImageTensorDataset
from lightning_defense.errors import ConfigurationError


def first_batch(loader):
    return next(iter(loader))


def check_served(images: torch.Tensor) -> None:
    # contract 1: float in [0, 1], NCHW
    assert images.dtype == torch.float32 and images.ndim == 4 and images.shape[1] == 3
    assert images.min() >= 0 and images.max() <= 1


def test_cifar10_image_folder_layout_with_attack(tmp_path, image_folder_writer):
    for split in ("train", "test"):
        image_folder_writer(tmp_path / split, list(CIFAR10_CLASSES), per_class=20)
    dm = CIFAR10DataModule(str(tmp_path), batch_size=16, attack=BadNets(target=0), reserved_fraction=0.1)
    dm.setup("fit")
    assert len(dm.train_set) == 180 and len(dm.reserved_set()) == 20
    assert dm.reserved_labels.bincount().tolist() == [2] * 10
    assert len(dm.poisoned_indices) == 18
    clean, poisoned = dm.val_dataloader()
    assert len(clean.dataset) == 200 and len(poisoned.dataset) == 180  # target class left out
    images, labels = first_batch(dm.train_dataloader())
    check_served(images)
    poisoned_images, attacker_labels, true_labels = first_batch(poisoned)
    assert attacker_labels.eq(0).all()
    # the poisoned images keep their own classes for the robust accuracy: the clean test labels, target left out
    clean_labels = clean.dataset.labels
    assert torch.equal(poisoned.dataset.true_labels, clean_labels[clean_labels != 0])
    assert torch.equal(true_labels, poisoned.dataset.true_labels[: len(true_labels)])


def test_test_fraction_evaluates_a_seeded_per_class_subset(tmp_path, image_folder_writer):
    for split in ("train", "test"):
        image_folder_writer(tmp_path / split, list(CIFAR10_CLASSES), per_class=20)

    def eval_sets(**kwargs):
        dm = CIFAR10DataModule(str(tmp_path), batch_size=16, attack=BadNets(target=0), **kwargs)
        dm.setup("fit")
        return dm.test_set, dm.poisoned_test_set

    full, _ = eval_sets()
    clean, poisoned = eval_sets(test_fraction=0.25)
    assert clean.labels.bincount().tolist() == [5] * 10  # a quarter of every class
    assert len(poisoned) == 45 and torch.equal(poisoned.true_labels, clean.labels[clean.labels != 0])
    # the subset is drawn from the test images themselves, the same for the same seed, another for another
    index = [next(i for i in range(len(full)) if torch.equal(full.images[i], image)) for image in clean.images]
    assert torch.equal(full.labels[index], clean.labels)
    assert torch.equal(eval_sets(test_fraction=0.25)[0].images, clean.images)
    assert not torch.equal(eval_sets(test_fraction=0.25, seed=1)[0].images, clean.images)
    with pytest.raises(ConfigurationError, match="test_fraction"):
        CIFAR10DataModule(str(tmp_path), test_fraction=0.0)


def test_reserved_split_is_seeded_per_class_and_disjoint():
    labels = torch.arange(1000) % 10
    kept, held = per_class_split(labels, 0.05, seed=3)
    assert len(held) == 50 and labels[held].bincount().tolist() == [5] * 10
    assert not set(kept.tolist()) & set(held.tolist()) and len(kept) + len(held) == 1000
    assert torch.equal(per_class_split(labels, 0.05, seed=3)[1], held)
    assert not torch.equal(per_class_split(labels, 0.05, seed=4)[1], held)


def test_reserved_images_never_reach_the_victim(tmp_path, image_folder_writer):
    for split in ("train", "test"):
        image_folder_writer(tmp_path / split, list(CIFAR10_CLASSES), per_class=10)
    dm = CIFAR10DataModule(str(tmp_path), reserved_fraction=0.2)
    dm.setup()
    train = {tuple(x.flatten()[:64].tolist()) for x in dm.train_set.images}
    reserved = {tuple(x.flatten()[:64].tolist()) for x in dm.reserved_images}
    assert len(reserved) == 20 and not train & reserved


def test_missing_data_root_says_how_to_get_it(tmp_path):
    dm = CIFAR10DataModule(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="download: true.*tar -xzf"):
        dm.setup()


def test_gtsrb_layout_resizes_and_counts_classes(tmp_path, image_folder_writer):
    classes = [f"{i:05d}" for i in range(43)]
    image_folder_writer(tmp_path / "train", classes, per_class=2, size=40)
    image_folder_writer(tmp_path / "test", classes, per_class=1, size=28)
    dm = GTSRBDataModule(str(tmp_path), batch_size=8, reserved_fraction=0.0)
    dm.setup()
    assert dm.num_classes == 43 and dm.train_set.images.shape[1:] == (3, 32, 32)
    assert dm.test_set.images.shape == (43, 3, 32, 32)


def test_image_folder_class_count_mismatch(tmp_path, image_folder_writer):
    for split in ("train", "test"):
        image_folder_writer(tmp_path / split, ["a", "b", "c"], per_class=2)
    with pytest.raises(ValueError, match="3 class folders but 5 classes"):
        ImageFolderDataModule(str(tmp_path), num_classes=5).setup()


def test_cinic10_published_layout(tmp_path, image_folder_writer):
    for split in ("train", "valid", "test"):
        image_folder_writer(tmp_path / split, list(CIFAR10_CLASSES), per_class=3, suffix=".png")
    dm = CINIC10DataModule(str(tmp_path), use_valid_for_training=True, reserved_fraction=0.0)
    dm.setup()
    assert len(dm.train_set) == 60 and len(dm.test_set) == 30
    check_served(first_batch(dm.train_dataloader())[0])


def test_synthetic_is_deterministic_and_class_dependent():
    a = SyntheticDataModule(train_per_class=20, test_per_class=5, reserved_fraction=0.0)
    b = SyntheticDataModule(train_per_class=20, test_per_class=5, reserved_fraction=0.0)
    a.setup(), b.setup()
    assert torch.equal(a.train_set.images, b.train_set.images)
    assert not torch.equal(a.train_set.images, a.test_set.images[: len(a.train_set)].repeat(4, 1, 1, 1))
    other = SyntheticDataModule(train_per_class=20, test_per_class=5, reserved_fraction=0.0, data_seed=1)
    other.setup()
    assert not torch.equal(a.train_set.images, other.train_set.images)
    # class means differ: a nearest-class-mean classifier beats chance by far
    images, labels = a.train_set.images.float(), a.train_set.labels
    means = torch.stack([images[labels == c].mean(0) for c in range(10)])
    test = a.test_set.images.float()
    predicted = torch.cdist(test.flatten(1), means.flatten(1)).argmin(1)
    assert (predicted == a.test_set.labels).float().mean() > 0.3


def test_embedded_subset_loads():
    dm = EmbeddedCIFAR10DataModule(reserved_fraction=0.0)
    dm.setup()
    assert len(dm.train_set) == 10_000 and len(dm.test_set) == 2_000
    assert dm.test_set.labels.bincount().tolist() == [200] * 10


def test_cifar10_torchvision_format(tmp_path, monkeypatch):
    """torchvision's own layout (cifar-10-batches-py); the fixture cannot match the official md5s."""
    import pickle

    import numpy as np
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list]
    for i, name in enumerate(names):
        batch = {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": [(i + j) % 10 for j in range(10)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, f)
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)
    dm = CIFAR10DataModule(str(tmp_path), reserved_fraction=0.0, augment=False)
    dm.setup()
    assert len(dm.train_set) == 50 and len(dm.test_set) == 10
    with open(folder / names[0], "rb") as f:
        first = pickle.load(f)["data"][0]
    assert torch.equal(dm.train_set.images[0], torch.from_numpy(first.copy()).view(3, 32, 32))


def test_batches_are_indexed_at_once_and_equal_per_image_loading():
    from torch.utils.data import ConcatDataset, DataLoader

    from lightning_defense.data.datasets import collate

    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    dataset = ImageTensorDataset(images, torch.arange(10), transform=lambda image: image.flip(-1))
    batch_images, batch_labels = dataset.__getitems__([3, 7, 1])
    singles = [dataset[i] for i in (3, 7, 1)]
    assert torch.equal(batch_images, torch.stack([image for image, _ in singles]))
    assert batch_labels.tolist() == [3, 7, 1]
    # the data modules' collate passes made batches on, and stacks per-item lists
    for data in (dataset, ConcatDataset([dataset])):
        loaded, labels = next(iter(DataLoader(data, batch_size=4, collate_fn=collate)))
        assert loaded.shape == (4, 3, 4, 4) and loaded.dtype == torch.float32 and labels.tolist() == [0, 1, 2, 3]
        assert torch.equal(loaded, images[:4].flip(-1).float() / 255)


def test_cifar100_torchvision_format(tmp_path, monkeypatch):
    """torchvision's CIFAR-100 layout (cifar-100-python): fine labels, 100 classes."""
    import pickle

    import numpy as np
    from torchvision.datasets import CIFAR100

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, count in (("train", 200), ("test", 100)):
        data = {
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            "fine_labels": [i % 100 for i in range(count)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(data, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i:02d}" for i in range(100)]}, f)
    monkeypatch.setattr(CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)
    dm = CIFAR100DataModule(str(tmp_path), reserved_fraction=0.0, augment=False, attack=BadNets(target=99))
    dm.setup()
    assert dm.num_classes == 100 and len(dm.train_set) == 200 and len(dm.test_set) == 100
    assert dm.test_set.labels.tolist() == [i % 100 for i in range(100)]
    assert len(dm.poisoned_test_set) == 99  # every test image but the target class's
    # the defender's reserved split comes from it like from any source
    source = CIFAR100DataModule(str(tmp_path), reserved_fraction=0.5, attack=BadNets(target=99))
    defense_data = DefenseDataModule(source, ReservedData(), batch_size=8)
    defense_data.setup("fit")
    assert len(defense_data.aux_set) == 100 and defense_data.aux_set.labels.unique().numel() == 100


def write_gtsrb_official(root, sizes=((30, 34), (50, 45))):
    """The layout torchvision's GTSRB unpacks: per-class training folders of PPMs (with the CSVs
    the archive holds beside them) and one test folder labelled by GT-final_test.csv."""
    from PIL import Image

    base = root / "gtsrb"
    for label in (0, 42):
        folder = base / "GTSRB" / "Training" / f"{label:05d}"
        folder.mkdir(parents=True)
        (folder / f"GT-{label:05d}.csv").write_text("Filename;Width;Height;ClassId\n")
        for i, size in enumerate(sizes):
            Image.new("RGB", size, (label * 6, 10 * i, 0)).save(folder / f"00000_{i:05d}.ppm")
    test = base / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, label in enumerate((42, 0, 42)):
        Image.new("RGB", (40, 40), (label * 6, 0, 0)).save(test / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;40;40;5;5;35;35;{label}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")


def test_gtsrb_torchvision_layout_is_read_and_resized(tmp_path):
    write_gtsrb_official(tmp_path)
    dm = GTSRBDataModule(str(tmp_path), reserved_fraction=0.0, augment=False)
    dm.setup()
    # the defender's reserved split comes from it like from any source
    defense_data = DefenseDataModule(
        GTSRBDataModule(str(tmp_path), reserved_fraction=0.5), ReservedData(), batch_size=2
    )
    defense_data.setup("fit")
    assert sorted(defense_data.aux_set.labels.tolist()) == [0, 42]
    assert dm.train_set.images.shape == (4, 3, 32, 32)
    assert sorted(dm.train_set.labels.tolist()) == [0, 0, 42, 42]
    assert dm.test_set.labels.tolist() == [42, 0, 42]  # the CSV's labels, in its order
    assert int(dm.test_set.images[0, 0, 16, 16]) == 252  # 42 * 6, the image written for that row


@pytest.mark.parametrize("module", ["gtsrb", "cifar100"])
def test_download_offline_names_the_manual_layout(tmp_path, monkeypatch, module):
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    if module == "gtsrb":
        monkeypatch.setattr("torchvision.datasets.gtsrb.download_and_extract_archive", offline)
        dm, layout = GTSRBDataModule(str(tmp_path), download=True), "GTSRB/Training/<class>/\\*.ppm"
    else:
        monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
        dm, layout = CIFAR100DataModule(str(tmp_path), download=True), "cifar-100-python exists"
    with pytest.raises(FileNotFoundError, match=f"could not be downloaded.*name resolution.*{layout}.*download: false"):
        dm.setup()


def test_missing_cifar100_and_gtsrb_say_download_true(tmp_path):
    for dm in (CIFAR100DataModule(str(tmp_path)), GTSRBDataModule(str(tmp_path))):
        with pytest.raises(FileNotFoundError, match="download: true"):
            dm.setup()
