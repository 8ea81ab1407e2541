"""Where do poisoned images go through a REFINE defense? ASR alone cannot tell.

ASR counts poisoned images predicted as the attacker's target. A permutation M moves the
victim's target class elsewhere, so ASR can be near zero while T still lets the trigger through
and the backdoor still fires, only under another label. This script loads an export
(``defended.safetensors``), poisons the clean test images whose true class is not the target
with the victim's own attack, and reports:

- ASR: poisoned images predicted as the attacker's label (contract 4), on the poisoned test
  set that validation uses;
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
from torchmetrics.classification import MulticlassAccuracy

from lightning_defense.attacks import attack_of_victim
from lightning_defense.data import CIFAR10DataModule
from lightning_defense.data.embedded_cifar10 import load_embedded_cifar10
from lightning_defense.defenses.components import load_defended
from lightning_defense.io.safetensors_files import read_safetensors


def test_images(cifar10_root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW test images and labels: the embedded subset, or the full CIFAR-10 test set."""
    if cifar10_root is None:
        return load_embedded_cifar10("test")
    data = CIFAR10DataModule(root=cifar10_root, reserved_fraction=0.0)
    data.setup("test")
    return data.test_set.images, data.test_set.labels


def histogram(classes: list[torch.Tensor], num_classes: int) -> list[int]:
    return torch.bincount(torch.cat(classes), minlength=num_classes).tolist()


@torch.no_grad()
def analyse(export: Path, cifar10_root: str | None, victim_path: str | None, batch_size: int = 500) -> dict:
    model = load_defended(export, victim_path)
    victim_path = victim_path or read_safetensors(export)[1]["victim_path"]
    attack = attack_of_victim(victim_path)
    num_classes = model.victim.num_classes
    images, labels = test_images(cifar10_root)
    # the poisoned test set exactly as validation builds it (contract 4), and the true classes beside it
    poisoned, attacker_labels = attack.poison_test_set(images, labels, num_classes)
    keep = attack.poisoned_test_images(labels)
    clean, true_labels = images[keep], labels[keep]
    accuracy = {name: MulticlassAccuracy(num_classes, average="micro") for name in ("clean", "asr", "poisoned")}
    victim_classes, defended_classes = [], []
    for clean_batch, poisoned_batch, true, attacker in zip(
        clean.split(batch_size),
        poisoned.split(batch_size),
        true_labels.split(batch_size),
        attacker_labels.split(batch_size),
    ):
        accuracy["clean"].update(model(clean_batch.float() / 255), true)
        victim_logits = model.victim(model.transform_net(poisoned_batch.float() / 255))
        defended = model.label_permutation(victim_logits)
        accuracy["asr"].update(defended, attacker)
        accuracy["poisoned"].update(defended, true)
        victim_classes.append(victim_logits.argmax(1))
        defended_classes.append(defended.argmax(1))
    return {
        "export": str(export),
        "test_set": cifar10_root or "embedded",
        "attack": attack.config(),
        "images": len(true_labels),
        "clean_accuracy": accuracy["clean"].compute().item(),
        "asr": accuracy["asr"].compute().item(),
        "poisoned_accuracy": accuracy["poisoned"].compute().item(),
        "victim_class_on_transformed_poisoned": histogram(victim_classes, num_classes),
        "defended_class_on_poisoned": histogram(defended_classes, num_classes),
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
    print(
        f"{result['images']} poisoned test images of the {result['test_set']} set "
        f"({result['attack']['class_path'].rsplit('.', 1)[-1]})"
    )
    print(f"clean accuracy     {100 * result['clean_accuracy']:6.2f}%  (the same images, unpoisoned)")
    print(f"ASR                {100 * result['asr']:6.2f}%")
    print(f"poisoned accuracy  {100 * result['poisoned_accuracy']:6.2f}%")
    print(f"victim's class on T(poisoned), per class: {result['victim_class_on_transformed_poisoned']}")
    print(f"defended prediction on poisoned, per class: {result['defended_class_on_poisoned']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
