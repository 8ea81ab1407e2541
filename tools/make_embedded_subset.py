"""Build the CIFAR-10 subset shipped inside the package (lightning_defense/data/embedded/).

The subset holds the original JPEG bytes of the shared CIFAR-10 archive (no re-encoding):
1,000 training images per class (10,000; unlabeled data for the defender, which REFINE's threat
model allows to come from the victim's own training distribution) and 200 test images per class
(2,000; for BA/ASR). Images are drawn per class with a fixed seed; their indices in the sorted
ImageFolder order are stored so every image can be traced to its file.

    tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C ~/.cache/lightning_defense/data
    python tools/make_embedded_subset.py ~/.cache/lightning_defense/data/cifar10-jpeg
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from lightning_defense.data.datamodules import CIFAR10_CLASSES

OUT = Path(__file__).resolve().parents[1] / "lightning_defense/data/embedded/cifar10_subset.safetensors"


def pack(root: Path, per_class: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    blobs, offsets, labels, indices = [], [0], [], []
    start = 0
    for label, name in enumerate(CIFAR10_CLASSES):
        files = sorted((root / name).glob("*.jpg"))
        chosen = torch.randperm(len(files), generator=generator)[:per_class].sort().values
        for i in chosen.tolist():
            data = files[i].read_bytes()
            blobs.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            offsets.append(offsets[-1] + len(data))
            labels.append(label)
            indices.append(start + i)  # position in the sorted ImageFolder order of the split
        start += len(files)
    return {
        "jpeg": torch.cat(blobs),
        "offsets": torch.tensor(offsets),
        "labels": torch.tensor(labels),
        "source_index": torch.tensor(indices),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="the cifar10-jpeg folder (train/ and test/ inside)")
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tensors = {}
    for split, per_class, offset in (("train", args.train_per_class, 0), ("test", args.test_per_class, 1)):
        tensors |= {f"{split}_{k}": v for k, v in pack(args.root / split, per_class, args.seed + offset).items()}
    metadata = {
        "source": "CIFAR-10 as JPEG (quality ~75), shared cifar10-jpeg archive, bytes copied verbatim",
        "command": f"python tools/make_embedded_subset.py <cifar10-jpeg> --train-per-class {args.train_per_class} "
        f"--test-per-class {args.test_per_class} --seed {args.seed}",
        "classes": ",".join(CIFAR10_CLASSES),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata=metadata)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
