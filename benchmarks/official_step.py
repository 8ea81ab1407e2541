"""REFINE's training step as the official code computes it, side by side with this project's
(issue 33, part 1).

The official step (WhitolfChen/REFINE, ``refine.py``), written here from its description: T is
the plain 4-level UNet of Ronneberger et al. with 64 channels at the top level and bilinear
upsampling (17.3M parameters: two 3x3 conv-BN-ReLU per level, max-pool down, skip concatenation,
a 1x1 output convolution); the defended output is the softmax of F(clamp(T(x), 0, 1)) permuted by
M; the loss is binary cross-entropy against the one-hot of the victim's answer on x plus 0.1 x
SupCon of the flattened T(x) (two identical views, tau 0.07); SGD, fp32. This project's step is
:class:`~lightning_defense.defenses.refine.RefineModel` at ``configs/refine_full.yaml``'s settings
(18.0M-parameter T), once in fp32 and once as ``precision: auto`` runs it on this machine (bf16
autocast and channels_last where the CPU or GPU computes bf16). Both train against the same
ResNet-18 victim network on the same random batch; the timed rounds interleave the sides so that a
drift in the machine's load hits them alike, and the ratio is taken per round.

``--epoch-images N`` also times a short epoch of N images with each side's data path: the
official per-image torchvision pipeline (PIL image, ToTensor, RandomResizedCrop(0.8-1),
horizontal flip, RandomGrayscale(0.2), Normalize) through a DataLoader, against this project's
in-memory uint8 batches and batched augmentation.

    OMP_NUM_THREADS=1 python benchmarks/official_step.py --compile --epoch-images 512 \\
        --out benchmarks/results/performance/official_step_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from machine_info import invocation, machine
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from lightning_defense.data.augmentation import BatchAugmentation
from lightning_defense.data.datasets import ImageTensorDataset, collate
from lightning_defense.defenses.components import LabelPermutation
from lightning_defense.defenses.refine import REFINE
from lightning_defense.defenses.refine.torch_model import supervised_contrastive_loss
from lightning_defense.training.hardware import auto_precision, uses_channels_last
from lightning_defense.victims import Classifier, VictimMetadata, save_victim

REPO = Path(__file__).resolve().parents[1]


def double_conv(c_in: int, c_out: int, c_mid: int | None = None) -> nn.Sequential:
    c_mid = c_mid or c_out
    return nn.Sequential(
        nn.Conv2d(c_in, c_mid, 3, padding=1),
        nn.BatchNorm2d(c_mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_mid, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class PlainUNet(nn.Module):
    """The classic UNet: four 2x max-pool downsamplings, bilinear upsampling, skip concatenation."""

    def __init__(self, channels: int = 3, width: int = 64) -> None:
        super().__init__()
        w = [width * 2**i for i in range(5)]  # 64 .. 1024
        self.inc = double_conv(channels, w[0])
        self.down = nn.ModuleList([double_conv(w[i], w[i + 1] // (2 if i == 3 else 1)) for i in range(4)])
        ins = [w[4], w[3], w[2], w[1]]  # concatenated widths at each level going up
        outs = [w[3] // 2, w[2] // 2, w[1] // 2, w[0]]
        self.up = nn.ModuleList([double_conv(c_in, c_out, c_in // 2) for c_in, c_out in zip(ins, outs, strict=True)])
        self.out = nn.Conv2d(w[0], channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        x = skips.pop()
        for up in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            x = up(torch.cat([skip, x], dim=1))
        return self.out(x)


class OfficialStep:
    """One optimizer step of the official recipe on a batch."""

    def __init__(self, victim: Classifier, num_classes: int) -> None:
        self.victim, self.unet = victim, PlainUNet()
        self.permutation = LabelPermutation(num_classes, 0).permutation
        self.optimizer = torch.optim.SGD(self.unet.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def __call__(self, images: torch.Tensor) -> None:
        with torch.no_grad():
            answer = self.victim(images).argmax(1)
        transformed = self.unet(images).clamp(0, 1)
        probabilities = self.victim(transformed).softmax(1)[:, self.permutation]
        bce = F.binary_cross_entropy(probabilities, F.one_hot(answer, probabilities.shape[1]).float())
        features = F.normalize(transformed.flatten(1), dim=1)
        supcon = supervised_contrastive_loss(torch.cat([features, features]), torch.cat([answer, answer]), 0.07)
        loss = bce + 0.1 * supcon
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class ProjectStep:
    """One optimizer step of this project's REFINE at a config's settings, in a given precision."""

    def __init__(
        self, victim_file: Path, config: Path, precision: str, channels_last: bool, compile_loss: bool = False
    ) -> None:
        settings = yaml.safe_load(config.read_text())["model"]["init_args"] | {"victim": str(victim_file)}
        self.model = REFINE(**settings).model.train()
        self.model.augmentation = None  # the data path is timed apart (--epoch-images)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        self.loss = torch.compile(self.model.loss) if compile_loss else self.model.loss
        self.optimizer = torch.optim.SGD(
            self.model.transform_net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=True
        )

    def __call__(self, images: torch.Tensor) -> None:
        images = images.contiguous(memory_format=self.memory_format)
        with torch.autocast("cpu", self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            loss = self.loss(images)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def seconds(step, images: torch.Tensor, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        step(images)
    return (time.perf_counter() - start) / count


class _OfficialImages(Dataset):
    """uint8 HWC arrays read one by one through the official torchvision pipeline."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images
        self.transform = transforms.Compose(
            [
                transforms.ToTensor(),
                transforms.RandomResizedCrop(size=32, scale=(0.8, 1.0)),
                transforms.RandomHorizontalFlip(),
                transforms.RandomGrayscale(p=0.2),
                transforms.Resize(32),
                transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), 0


def epoch_seconds(step, loader: DataLoader, augmentation=None) -> float:
    start = time.perf_counter()
    for images, *_ in loader:
        if augmentation is not None:
            images = augmentation(images.float().div(255))
        step(images)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "refine_full.yaml")
    parser.add_argument("--victim-arch", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side and round")
    parser.add_argument("--epoch-images", type=int, default=0, help="also time an epoch of this many images")
    parser.add_argument("--epoch-rounds", type=int, default=3, help="interleaved epochs per side")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the official data path")
    parser.add_argument("--compile", action="store_true", help="add this project's step under torch.compile")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    torch.manual_seed(0)
    victim = Classifier(args.victim_arch, 10)
    folder = Path(tempfile.mkdtemp())
    victim_file = save_victim(folder / "victim.safetensors", victim, VictimMetadata(args.victim_arch, 10))
    auto = auto_precision("cpu").precision
    auto_layout = uses_channels_last(argparse.Namespace(accelerator="cpu", precision=auto))
    sides = {
        "official (fp32)": OfficialStep(Classifier(args.victim_arch, 10).freeze(), 10),
        "project fp32": ProjectStep(victim_file, args.config, "32-true", False),
        f"project auto ({auto}{', channels_last' if auto_layout else ''})": ProjectStep(
            victim_file, args.config, auto, auto_layout
        ),
    }
    if args.compile:
        sides["project auto + torch.compile"] = ProjectStep(victim_file, args.config, auto, auto_layout, True)
    sides["official (fp32)"].victim.load_state_dict(victim.state_dict())
    parameters = {
        "official T": sum(p.numel() for p in sides["official (fp32)"].unet.parameters()),
        "project T": sum(p.numel() for p in sides["project fp32"].model.transform_net.parameters()),
    }
    images = torch.rand(args.batch_size, 3, 32, 32)
    compile_s = {}
    for name, step in sides.items():  # warm-up (and compilation, timed apart)
        start = time.perf_counter()
        step(images)
        step(images)
        compile_s[name] = time.perf_counter() - start
    per_round: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, step in sides.items():
            per_round[name].append(args.batch_size / seconds(step, images, args.steps))
    official = per_round["official (fp32)"]
    rows = {
        name: {
            "images_per_s": statistics.median(rates),
            "ratio_to_official": statistics.median(r / o for r, o in zip(rates, official, strict=True)),
        }
        for name, rates in per_round.items()
    }
    result = {
        "machine": machine(),
        "argv": invocation(),
        "batch_size": args.batch_size,
        "victim": args.victim_arch,
        "parameters": parameters,
        "steps": rows,
        "first_two_steps_s": compile_s,
    }
    if args.epoch_images:
        pixels = np.random.default_rng(0).integers(0, 256, (args.epoch_images, 32, 32, 3), dtype=np.uint8)
        official_loader = DataLoader(
            _OfficialImages(pixels), batch_size=args.batch_size, shuffle=True, num_workers=args.workers, drop_last=True
        )
        ours = ImageTensorDataset(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.zeros(len(pixels)))
        our_loader = DataLoader(ours, batch_size=args.batch_size, shuffle=True, collate_fn=collate, drop_last=True)
        name_auto = next(n for n in sides if n.startswith("project auto"))
        official_s, ours_s = [], []
        for _ in range(args.epoch_rounds):  # interleaved, as the steps
            official_s.append(epoch_seconds(sides["official (fp32)"], official_loader))
            ours_s.append(epoch_seconds(sides[name_auto], our_loader, BatchAugmentation()))
        result["epoch"] = {
            "images": args.epoch_images,
            "official_s": statistics.median(official_s),
            "project_auto_s": statistics.median(ours_s),
            "ratio": statistics.median(o / p for o, p in zip(official_s, ours_s, strict=True)),
        }
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result))


def markdown(result: dict) -> str:
    """The result as the Markdown table the results page shows."""
    lines = [
        f"REFINE training step, batch {result['batch_size']}, {result['victim']} victim "
        f"(T: official {result['parameters']['official T'] / 1e6:.1f}M, this project's "
        f"{result['parameters']['project T'] / 1e6:.1f}M parameters); command: `{' '.join(result['argv'])}`",
        "",
        "| step | images/s | x official | first two steps s |",
        "|---|---|---|---|",
    ]
    for name, row in result["steps"].items():
        first = result.get("first_two_steps_s", {}).get(name)
        lines.append(
            f"| {name} | {row['images_per_s']:.1f} | {row['ratio_to_official']:.2f} | "
            f"{'–' if first is None else f'{first:.0f}'} |"
        )
    if "epoch" in result:
        epoch = result["epoch"]
        lines += [
            "",
            f"An epoch of {epoch['images']} images with each side's data path: official "
            f"{epoch['official_s']:.1f} s, this project's (auto) {epoch['project_auto_s']:.1f} s, "
            f"x{epoch['ratio']:.2f}.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
