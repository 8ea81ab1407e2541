"""Defended inference against the bare victim (issue 33, part 2): M(F(T(x))) as trained, folded
(:func:`~lightning_defense.defenses.components.fold_for_inference`: M into F's last linear layer,
BatchNorm into the convolutions) and folded under ``torch.compile``, each against F alone, at
batch 1 and a large batch, in this machine's inference precision (``precision: auto``).

Each REFINE config gives T's settings; its victim is the config's file when it exists (the
embedded default's shipped ResNet-20), else a random network of ``--victim-arch`` (speed does not
depend on the weights). Rounds interleave the variants so that a drift in the machine's load hits
them alike; the ratio (variant latency / bare victim latency) is taken per round, a compiled variant
against the compiled bare victim.

    OMP_NUM_THREADS=1 python benchmarks/defended_inference.py \\
        --configs configs/refine.yaml configs/refine/small_transform.yaml \\
        --out benchmarks/results/performance/defended_inference_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from machine_info import invocation, machine

from lightning_defense.defenses.components import fold_for_inference
from lightning_defense.defenses.refine import REFINE
from lightning_defense.io.shipped import resolve
from lightning_defense.training.hardware import auto_precision
from lightning_defense.victims import Classifier, VictimMetadata, save_victim

REPO = Path(__file__).resolve().parents[1]


def settings_of(configs: list[Path]) -> dict:
    """The model's init_args after layering ``configs`` in order (a layer only changes keys)."""
    settings: dict = {}
    for config in configs:
        settings |= (yaml.safe_load(config.read_text()).get("model") or {}).get("init_args") or {}
    return settings


def latency(fn, images: torch.Tensor, calls: int, autocast) -> float:
    with torch.inference_mode(), autocast():
        start = time.perf_counter()
        for _ in range(calls):
            fn(images)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs",
        type=Path,
        nargs="+",
        default=[REPO / "configs" / "refine.yaml"],
        help="REFINE configs, a row each; a file under configs/refine/ is layered on configs/refine.yaml",
    )
    parser.add_argument("--victim-arch", default="resnet18", help="the victim where a config's file does not exist")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=0, help="calls per round (default: about 512 images a round)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    precision = auto_precision("cpu").precision
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None)

    rows = []
    for config in (c.resolve() for c in args.configs):
        layers = [REPO / "configs" / "refine.yaml", config] if config.parent.name == "refine" else [config]
        settings = settings_of(layers)
        if not resolve(settings["victim"]).is_file():
            torch.manual_seed(0)
            victim_file = Path(tempfile.mkdtemp()) / "victim.safetensors"
            save_victim(victim_file, Classifier(args.victim_arch, 10), VictimMetadata(args.victim_arch, 10))
            settings["victim"] = str(victim_file)
        model = REFINE(**settings).model.eval()
        folded = fold_for_inference(model)
        variants = {"bare victim": model.victim, "defended": model, "folded": folded}
        if not args.no_compile:  # compiled against compiled: torch.compile speeds the bare victim up too
            variants["bare victim + torch.compile"] = torch.compile(model.victim)
            variants["folded + torch.compile"] = torch.compile(folded)
        parameters = sum(p.numel() for p in model.transform_net.parameters())
        for batch_size in args.batch_sizes:
            images = torch.rand(batch_size, 3, 32, 32)
            calls = args.calls or max(2, 512 // batch_size)
            for fn in variants.values():  # warm-up and compilation
                latency(fn, images, 2, autocast)
            seconds: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    seconds[name].append(latency(fn, images, calls, autocast))

            def bare(name: str, seconds: dict[str, list[float]] = seconds) -> list[float]:
                return seconds["bare victim + torch.compile" if name.endswith("torch.compile") else "bare victim"]

            rows.append(
                {
                    "config": " + ".join(str(c.relative_to(REPO)) for c in layers),
                    "victim": model.victim.arch,
                    "transform_parameters": parameters,
                    "batch_size": batch_size,
                    "latency_ms": {name: 1000 * statistics.median(s) for name, s in seconds.items()},
                    # per round, against the bare victim run the same way (eager or compiled)
                    "ratio_to_bare": {
                        name: statistics.median(a / b for a, b in zip(s, bare(name), strict=True))
                        for name, s in seconds.items()
                    },
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    result = {"machine": machine(), "argv": invocation(), "precision": precision}
    result["rows"] = rows
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result))


def markdown(result: dict) -> str:
    """The result as the Markdown table the results page shows: latency and its ratio to the bare victim."""
    names = list(result["rows"][0]["latency_ms"]) if result["rows"] else []
    lines = [
        f"Defended inference ({result['precision']}); command: `{' '.join(result['argv'])}`",
        "",
        "| config | victim | T parameters | batch | " + " | ".join(f"{n} ms (x bare)" for n in names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for row in result["rows"]:
        cells = [f"{row['latency_ms'][n]:.2f} (x{row['ratio_to_bare'][n]:.2f})" for n in names]
        head = (
            f"| {row['config']} | {row['victim']} | {row['transform_parameters'] / 1e6:.2f}M | {row['batch_size']} | "
        )
        lines.append(head + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
