"""REFINE throughput: training images/s, and inference latency of the bare vs the defended model.

Measured in one process, side by side, on random [0, 1] images (speed does not depend on
content). T, M and the loss are those of a REFINE config's ``model.init_args`` (default: the
embedded default), so the numbers are for what that config trains. Prints a table and writes
JSON with the machine, torch version, device and settings.

    python benchmarks/refine_throughput.py --precision bf16 --out benchmarks/results/refine_throughput_cpu.json
    python benchmarks/refine_throughput.py --config configs/refine_full.yaml --victim <victim file> --channels-last
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml
from machine_info import machine

from lightning_defense.defenses.refine import REFINE


def timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call, after warm-up."""
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/refine.yaml"), help="a REFINE config")
    parser.add_argument("--victim", help="victim file instead of the config's")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    device = torch.device(args.device)
    init_args = yaml.safe_load(args.config.read_text())["model"]["init_args"] | (
        {"victim": args.victim} if args.victim else {}
    )
    model = REFINE(**init_args).model.to(device)
    victim, transform_net = model.victim, model.transform_net
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    images = torch.rand(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.transform_net.parameters(), lr=0.01, momentum=0.9)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")

    def train_step() -> None:
        with autocast:
            loss = model.loss(images)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer(module) -> callable:
        def run() -> None:
            with torch.inference_mode(), autocast:
                module(images)

        return run

    model.train()
    train = timed(train_step, args.steps, device)
    model.eval()
    bare = timed(infer(victim), args.steps, device)
    defended = timed(infer(model), args.steps, device)
    result = {
        "machine": machine(),
        "device": str(device),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": init_args,
        "transform_net_parameters": sum(p.numel() for p in transform_net.parameters()),
        "train_images_per_s": args.batch_size / train,
        "bare_latency_ms_per_batch": 1000 * bare,
        "defended_latency_ms_per_batch": 1000 * defended,
        "defended_over_bare": defended / bare,
    }
    print(f"{'':28}{'value':>12}")
    print(f"{'training images/s':28}{result['train_images_per_s']:12.1f}")
    print(f"{'bare latency ms/batch':28}{result['bare_latency_ms_per_batch']:12.2f}")
    print(f"{'defended latency ms/batch':28}{result['defended_latency_ms_per_batch']:12.2f}")
    print(f"{'defended / bare':28}{result['defended_over_bare']:12.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
