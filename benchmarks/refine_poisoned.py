"""Where do poisoned images go through a REFINE defense? ASR alone cannot tell.

ASR counts poisoned images predicted as the attacker's target. A permutation M moves the
victim's target class elsewhere, so ASR can be near zero while T still lets the trigger through
and the backdoor still fires, only under another label. This script loads an export
(``defended.safetensors``), poisons the clean test images whose true class is not the target
with the victim's own attack, and reports:

- ASR: poisoned images predicted as the target (contract 4);
- poisoned accuracy: poisoned images predicted as their true class (a removed trigger gives
  about the clean accuracy);
- the victim's class on T(poisoned) and the defended prediction, as histograms: a surviving
  backdoor shows as one dominant victim class (the target) and one dominant defended class
  (M's image of the target).

    python benchmarks/refine_poisoned.py runs/refine/version_0/defended.safetensors
    python benchmarks/refine_poisoned.py <export> --cifar10 ~/.cache/ld/cifar10-jpeg --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from machine_info import machine

from lightning_defense.attacks import attack_from_config
from lightning_defense.data import CIFAR10DataModule
from lightning_defense.data.embedded_cifar10 import load_embedded_cifar10
from lightning_defense.defenses.refine.deploy import load_defended
from lightning_defense.safetensors_io import read_safetensors
from lightning_defense.victims.victim_file import read_victim_metadata


def test_images(cifar10_root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW test images and labels: the embedded subset, or the full CIFAR-10 test set."""
    if cifar10_root is None:
        return load_embedded_cifar10("test")
    data = CIFAR10DataModule(root=cifar10_root, reserved_fraction=0.0)
    data.setup("test")
    return data.test_set.images, data.test_set.labels


@torch.no_grad()
def analyse(export: Path, cifar10_root: str | None, victim_path: str | None, batch_size: int = 500) -> dict:
    model = load_defended(export, victim_path)
    victim_file = victim_path or read_safetensors(export)[1]["victim_path"]
    attack = attack_from_config(read_victim_metadata(victim_file).attack)
    images, labels = test_images(cifar10_root)
    keep = labels != attack.target
    images, labels = images[keep], labels[keep]
    num_classes = model.victim.num_classes
    clean, poisoned, victim_on_transformed = [], [], []
    for batch in images.split(batch_size):
        batch = batch.float() / 255
        clean.append(model(batch).argmax(1))
        transformed = model.transform_net(attack.apply(batch))
        victim_on_transformed.append(model.victim(transformed).argmax(1))
        poisoned.append(model.label_permutation(model.victim(transformed)).argmax(1))
    clean, poisoned, victim_on_transformed = torch.cat(clean), torch.cat(poisoned), torch.cat(victim_on_transformed)
    return {
        "export": str(export),
        "test_set": cifar10_root or "embedded",
        "images": len(labels),
        "target": attack.target,
        "clean_accuracy": (clean == labels).float().mean().item(),
        "asr": (poisoned == attack.target).float().mean().item(),
        "poisoned_accuracy": (poisoned == labels).float().mean().item(),
        "victim_class_on_transformed_poisoned": torch.bincount(victim_on_transformed, minlength=num_classes).tolist(),
        "defended_class_on_poisoned": torch.bincount(poisoned, minlength=num_classes).tolist(),
        "permutation": model.label_permutation.permutation.tolist(),
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="defended.safetensors written by REFINE's fit")
    parser.add_argument("--cifar10", help="CIFAR-10 folder (ImageFolder layout); default: the embedded test set")
    parser.add_argument("--victim", help="victim file, when it moved since the export was written")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    result = analyse(args.export, args.cifar10, args.victim)
    print(f"{result['images']} test images of the {result['test_set']} set whose class is not the target "
          f"({result['target']})")
    print(f"clean accuracy     {100 * result['clean_accuracy']:6.2f}%  (the same images, unpoisoned)")
    print(f"ASR                {100 * result['asr']:6.2f}%")
    print(f"poisoned accuracy  {100 * result['poisoned_accuracy']:6.2f}%")
    print(f"victim's class on T(poisoned), per class: {result['victim_class_on_transformed_poisoned']}")
    print(f"defended prediction on poisoned, per class: {result['defended_class_on_poisoned']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
