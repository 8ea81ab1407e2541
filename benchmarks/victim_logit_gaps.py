"""How far below the victim's top logit the class REFINE asks for lies, at T = identity.

REFINE's classification loss asks M(F(x)) for the victim's own answer, i.e. the victim's output
``permutation[y]``; at the start (T the identity) that logit sits below the top one. If the gap
were huge, a softmax would round the asked-for probability to 0 in float32 and BCE on the softmax
(the official loss form) would get no gradient. This measures the gap on embedded training images.

    python benchmarks/victim_logit_gaps.py checkpoints/cifar10_resnet20_{badnets,blended,wanet}.safetensors \\
        --json benchmarks/results/victim_logit_gaps.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from machine_info import machine

from lightning_defense.data import load_embedded_cifar10
from lightning_defense.defenses.refine.torch_model import LabelPermutation
from lightning_defense.victims import load_victim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("victims", nargs="+", type=Path)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    images, _ = load_embedded_cifar10("train")
    images = images[: args.images].float() / 255
    permutation = LabelPermutation(10, seed=0)
    results = {}
    for path in args.victims:
        victim = load_victim(path)
        with torch.no_grad():
            answers = victim(images)
        wanted = answers.argmax(1)  # the victim's answer, which M(F(x)) is asked for
        logits = permutation(answers)
        gap = logits.max(1).values - logits.gather(1, wanted[:, None])[:, 0]
        probability = logits.softmax(1).gather(1, wanted[:, None])[:, 0]
        logits = logits.clone().requires_grad_(True)
        F.binary_cross_entropy(logits.softmax(1), F.one_hot(wanted, 10).float()).backward()
        results[path.name] = {
            "median_gap": float(gap.median()),
            "max_gap": float(gap.max()),
            "share_probability_below_1e-12": float((probability < 1e-12).float().mean()),
            "share_bce_gradient_norm_below_1e-6": float((logits.grad.norm(dim=1) < 1e-6).float().mean()),
        }
        print(path.name, results[path.name])
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "images": args.images, "victims": results}, indent=1))


if __name__ == "__main__":
    main()
