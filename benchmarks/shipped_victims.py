"""Measure every shipped victim (``checkpoints/*.safetensors``) on its full test set and write
``checkpoints/victims.json``: per file its SHA-256 and BA / ASR / RA / ASR-any (fp32), as every module
defines them (``lightning_defense.metrics``), with the poisoned test set its own file records.
``lightning-defense shipped`` shows them; a file changed since (another SHA-256) shows none.

    LIGHTNING_DEFENSE_DATA=<folder with cifar10-jpeg/> python benchmarks/shipped_victims.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from machine_info import machine
from torchmetrics.classification import MulticlassAccuracy

from lightning_defense.data import DefenseDataModule, SeenData
from lightning_defense.data.datamodules import CIFAR10DataModule
from lightning_defense.io.safetensors_files import sha256
from lightning_defense.io.shipped import MEASURED, is_victim_file
from lightning_defense.metrics import AnyClassAttackSuccess, split_batch
from lightning_defense.victims import load_victim

REPO = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def measure(path: Path, batch_size: int) -> dict[str, float]:
    victim = load_victim(path)
    metadata = victim.metadata
    data = metadata.data or {}
    if not str(data.get("class_path", "")).endswith("CIFAR10DataModule"):
        raise SystemExit(f"{path}: trained on {data.get('class_path')}; this script measures CIFAR-10 victims")
    source = CIFAR10DataModule(reserved_fraction=data["reserved_fraction"], seed=data["seed"])
    clean_victim = metadata.attack is None  # BA only: there is no poisoned test set to build
    module = (
        source if clean_victim else DefenseDataModule(source, SeenData(per_class=1), str(path), batch_size=batch_size)
    )
    module.prepare_data()
    module.setup("validate")
    classes = victim.num_classes
    ba, asr, ra = (MulticlassAccuracy(classes, average="micro") for _ in range(3))
    asr_any = AnyClassAttackSuccess(classes)
    clean, *poisoned = module.val_dataloader()
    for batch in clean:
        images, labels, _ = split_batch(batch)
        ba.update(victim(images), labels)
    if clean_victim:
        return {"ba": ba.compute().item()}
    for batch in poisoned[0]:
        images, labels, true_labels = split_batch(batch)
        logits = victim(images)
        asr.update(logits, labels)
        ra.update(logits, true_labels)
        asr_any.update(logits, true_labels)
    return {
        name: metric.compute().item() for name, metric in zip(("ba", "asr", "ra", "asr_any"), (ba, asr, ra, asr_any))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=REPO / "checkpoints")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    out = args.folder / MEASURED
    # files measured before and unchanged since are kept (an interrupted run goes on where it stopped)
    earlier = json.loads(out.read_text())["victims"] if out.is_file() else {}
    victims = {}
    for path in sorted(args.folder.glob("*.safetensors")):
        if not is_victim_file(path):  # IAD's generators (read through their victim), BDMAE's MAE
            continue
        digest = sha256(path)
        if earlier.get(path.name, {}).get("sha256") == digest:
            victims[path.name] = earlier[path.name]
            continue
        start = time.monotonic()
        metrics = measure(path, args.batch_size)
        victims[path.name] = {"sha256": digest, "metrics": metrics}
        shown = ", ".join(f"{key} {100 * value:.2f}" for key, value in metrics.items())
        print(f"{path.name}: {shown} ({time.monotonic() - start:.0f} s)", flush=True)
        result = {"machine": machine(), "argv": ["benchmarks/shipped_victims.py", *sys.argv[1:]], "victims": victims}
        out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
