"""Does REFINE's training augmentation fire a victim's backdoor?

REFINE labels the defender's images with the victim's own answers. If an augmentation looks
like a trigger to the victim, labels taken on augmented images are the attacker's target, and
T learns the backdoor from them. This script draws training images (clean, never poisoned),
and for each victim file reports the share the victim assigns to its attack's target class on
the images as they are and on the recipe's augmentation of them (RandomResizedCrop at scale
0.8 to 1, horizontal flip, RandomGrayscale p 0.2), plus the same with each part alone.

    python benchmarks/augmentation_fires_backdoor.py checkpoints/cifar10_resnet20_{badnets,blended,wanet}.safetensors \
        --cifar10 ~/.cache/ld/cifar10-jpeg --json benchmarks/results/augmentation_fires_backdoor.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from machine_info import machine
from torchvision.transforms import v2

from lightning_defense.data import CIFAR10DataModule
from lightning_defense.data.augmentation import RefineAugmentation, augment_each
from lightning_defense.data.embedded_cifar10 import load_embedded_cifar10
from lightning_defense.victims import load_victim
from lightning_defense.victims.victim_file import read_victim_metadata


def training_images(cifar10_root: str | None, count: int, seed: int) -> torch.Tensor:
    """``count`` float training images in [0, 1]: the embedded subset's, or the full CIFAR-10's."""
    if cifar10_root is None:
        images = load_embedded_cifar10("train")[0]
    else:
        data = CIFAR10DataModule(root=cifar10_root, reserved_fraction=0.0)
        data.setup("fit")
        images = data.train_set.images
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    return images[chosen].float() / 255


def augmentations(size: int) -> dict[str, v2.Transform | None]:
    return {
        "none": None,
        "recipe": RefineAugmentation(size),
        "random_resized_crop": v2.RandomResizedCrop(size, scale=(0.8, 1.0)),
        "horizontal_flip": v2.RandomHorizontalFlip(p=1.0),
        "grayscale": v2.RandomGrayscale(p=1.0),
    }


@torch.no_grad()
def target_share(victim_path: str, images: torch.Tensor, seed: int, batch_size: int = 500) -> dict:
    victim = load_victim(victim_path)
    target = read_victim_metadata(victim_path).attack["init_args"]["target"]
    result: dict = {"target": target}
    for name, transform in augmentations(images.shape[-1]).items():
        torch.manual_seed(seed)  # the same random draws for every victim
        inputs = images if transform is None else augment_each(transform, images)
        predictions = torch.cat([victim(batch).argmax(1) for batch in inputs.split(batch_size)])
        result[name] = round(100 * (predictions == target).float().mean().item(), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("victims", nargs="+")
    parser.add_argument("--cifar10", help="CIFAR-10 folder; default: the embedded subset")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    images = training_images(args.cifar10, args.images, args.seed)
    rows = {path: target_share(path, images, args.seed) for path in args.victims}
    print(f"% of {len(images)} clean training images the victim assigns to its target class")
    names = list(augmentations(images.shape[-1]))
    print("| victim | target | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for path, row in rows.items():
        print(f"| {Path(path).stem} | {row['target']} | " + " | ".join(f"{row[n]:.2f}" for n in names) + " |")
    if args.json:
        report = {"images": len(images), "seed": args.seed, "victims": rows, "machine": machine()}
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
