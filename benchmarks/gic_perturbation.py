"""What Guided Input Calibration does to the images of a study: per kind of auxiliary data, how far
the calibrated images are from the originals and how the victim sees both.

For each kind in a study config (``configs/studies/aux_shift.yaml`` by default) it builds the kind's
labeled images, calibrates them with the study's GIC settings (from the on-disk cache when the
study already did) and reports: mean |delta| and the share of pixels at the L-infinity bound (in
0-255 units), and the victim's accuracy on the labels, in eval mode, on the original images, on the
calibrated ones, and on the calibrated ones after one random crop (pad 4) and flip each, the
augmentation FT trains with.

    LIGHTNING_DEFENSE_DATA=~/.cache/ld python benchmarks/gic_perturbation.py \
        [--study configs/studies/aux_shift.yaml] [--out benchmarks/results/study_aux_shift/gic_perturbation.md]
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentParser

from lightning_defense.data import AuxiliaryData, Calibrated, CIFAR10DataModule, CropFlip
from lightning_defense.data.augmentation import augment_each
from lightning_defense.lazy import import_all
from lightning_defense.victims import Classifier, load_victim


def accuracy(victim: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return 100 * (victim.predict_labels(images) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, default=Path("configs/studies/aux_shift.yaml"))
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    args = parser.parse_args()

    study = yaml.safe_load(args.study.read_text())
    victim = load_victim(study["victim"])
    source = CIFAR10DataModule(reserved_fraction=0.05, seed=0)  # the study's `arguments`: the victim's split
    source.setup("fit")
    import_all("lightning_defense.data")  # the study names the kinds of data by short class names
    builder = ArgumentParser()
    builder.add_argument("--aux", type=AuxiliaryData)
    calibration = study.get("calibration") or {}
    bound = round(255 * calibration.get("epsilon", 0.1))  # uint8 rounding puts a pixel at the bound 1 below it
    torch.manual_seed(0)

    lines = [
        "| aux data | mean abs delta (/255) | pixels at the bound % | victim acc. original % "
        "| victim acc. calibrated % | calibrated, after crop+flip % |",
        "|---|---|---|---|---|---|",
    ]
    start = time.monotonic()
    for name, spec in study["aux_data"].items():
        base = builder.instantiate(builder.parse_object({"aux": spec})).aux
        images, labels = base.select(source, victim)
        calibrated, _ = Calibrated(base, **calibration).select(source, victim)
        delta = (calibrated.float() - images.float()).abs()
        augmented = augment_each(CropFlip(), calibrated)  # FT's own training augmentation
        lines.append(
            f"| {name} | {delta.mean():.1f} | {100 * (delta >= bound - 1).float().mean():.1f} "
            f"| {accuracy(victim, images, labels):.2f} | {accuracy(victim, calibrated, labels):.2f} "
            f"| {accuracy(victim, augmented, labels):.2f} |"
        )
        print(lines[-1], flush=True)
    lines.append(
        f"\nVictim `{study['victim']}`, GIC {calibration}; labels as the study's labeled cells "
        f"(FT, BTI-DBF) see them. {time.monotonic() - start:.0f} s on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}. Command: `python {shlex.join(sys.argv)}`."
    )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
