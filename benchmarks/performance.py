"""Where the time goes: victim training, REFINE training, BTI-DBF's phases and defended
inference, each timed *plain* and *optimized* side by side in one process, so that the ratio
(optimized / plain) holds even on a shared machine whose absolute speed drifts.

plain: fp32, contiguous memory, one ``__getitem__`` per image, REFINE's augmentation by v2 per
image, the foreach SGD. optimized: what the framework does on this machine: the precision and
memory layout that ``precision: auto`` and ``channels_last: auto`` pick (bf16 autocast and
channels_last where the device computes bf16, fp32 NCHW on a CPU without bf16 instructions),
batches indexed at once (``ImageTensorDataset.__getitems__``), the batched augmentation (one
``grid_sample``), the fused SGD. ``--compile`` adds rows with ``torch.compile`` on top of
optimized and reports the compilation time apart. ``--grid`` instead times each training step in
fp32 and bf16, NCHW and NHWC, and says which of the four ``auto`` picks here and how far it is from
the fastest: the proof that the choice fits the machine. Images are random (speed does not
depend on content); the models are those of the configs (T, M, loss of a REFINE config; G,
purifier, mask of a BTI-DBF config). Prints a table and writes JSON with the machine, torch
version, device, precision and settings; ``--profile`` adds the top operators of the optimized
REFINE step (torch.profiler).

    python benchmarks/performance.py --out benchmarks/results/performance/cpu.json --profile
    python benchmarks/performance.py --refine-config configs/refine_full.yaml \\
        --btidbf-config configs/btidbf_p_full.yaml --victim-arch resnet18 --batch-size 256 --compile \\
        --out benchmarks/results/performance/h100.json
    OMP_NUM_THREADS=1 python benchmarks/performance.py --grid --steps 2 \\
        --out benchmarks/results/performance/grid_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import yaml
from machine_info import machine
from torch.utils.data import DataLoader

from lightning_defense.data.augmentation import BatchAugmentation, RefineAugmentation, augment_each
from lightning_defense.data.datasets import ImageTensorDataset, collate
from lightning_defense.defenses.btidbf import BTIDBFPurification
from lightning_defense.defenses.refine import REFINE
from lightning_defense.training.hardware import auto_precision, cpu_bf16_instructions, uses_channels_last
from lightning_defense.victims import Classifier

MODES = ("plain", "optimized")


def timed(fn: Callable[[], object], steps: int, device: torch.device, warmup: int = 3) -> float:
    """Seconds per call after ``warmup`` calls (synchronizing the GPU around the timed calls)."""
    for _ in range(warmup):
        fn()
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize()
    return (time.perf_counter() - start) / steps


class Setting:
    """What a mode changes: precision, memory format, optimizer kind, data path, augmentation.

    ``precision`` and ``channels_last`` default to the mode's: ``plain`` runs fp32 NCHW, the others
    what ``precision: auto`` and ``channels_last: auto`` resolve to on ``device``
    (:mod:`lightning_defense.training.hardware`); the grid sets both itself.
    """

    def __init__(
        self, mode: str, device: torch.device, precision: str | None = None, channels_last: bool | None = None
    ) -> None:
        self.mode = mode
        self.optimized = mode != "plain"
        self.device = device
        if precision is None:
            precision = auto_precision(device.type).precision if self.optimized else "32-true"
        self.precision = precision
        self.autocast_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        if channels_last is None:  # the layout `channels_last: auto` picks for this device and precision
            trainer_like = SimpleNamespace(accelerator=device.type, precision=precision)
            channels_last = self.optimized and uses_channels_last(trainer_like)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.augmentation = BatchAugmentation() if self.optimized else _PerImageAugmentation()

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.autocast_dtype or torch.bfloat16
        return torch.autocast(self.device.type, dtype, enabled=self.autocast_dtype is not None)

    def images(self, batch_size: int) -> torch.Tensor:
        return torch.rand(batch_size, 3, 32, 32, device=self.device).contiguous(memory_format=self.memory_format)

    def module(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device, memory_format=self.memory_format)

    def sgd(self, params, lr: float = 0.01) -> torch.optim.Optimizer:
        kind = {"fused": True} if self.optimized else {"foreach": True}
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, **kind)

    def loader(self, size: int, batch_size: int) -> DataLoader:
        """A shuffled in-memory loader over ``size`` uint8 images, as the data modules build it."""
        dataset = ImageTensorDataset(
            torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (size,))
        )
        if not self.optimized:
            dataset = _PerItem(dataset.images, dataset.labels)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate, drop_last=True)


class _PerItem(ImageTensorDataset):
    __getitems__ = None  # the DataLoader falls back to one __getitem__ per image


class _PerImageAugmentation(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return augment_each(RefineAugmentation(tuple(images.shape[-2:])), images)


def endless(loader: DataLoader, device: torch.device):
    while True:
        for images, _ in loader:
            yield images.to(device, non_blocking=True)


def train_step(loss_fn: Callable[[torch.Tensor], torch.Tensor], optimizer, setting: Setting, batches):
    def step() -> None:
        with setting.autocast():
            loss = loss_fn(next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def fixed(images: torch.Tensor):
    while True:
        yield images


class Rows:
    """What each row times, as ``make(setting) -> step``: the models of the configs, random data."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device, self.n = args, device, args.batch_size
        self.refine_args = yaml.safe_load(args.refine_config.read_text())["model"]["init_args"]
        self.btidbf_args = yaml.safe_load(args.btidbf_config.read_text())["model"]["init_args"]
        if args.victim:
            self.refine_args["victim"] = self.btidbf_args["victim"] = args.victim

    def compute(self) -> dict[str, Callable[[Setting], Callable[[], object]]]:
        """The training steps: the rows whose speed depends on precision and memory layout."""
        rows = {f"victim training ({self.args.victim_arch})": self.victim_training}
        rows["REFINE training step"] = self.refine_training
        for phase in ("mask", "generator", "purifier"):
            rows[f"BTI-DBF step: {phase}"] = partial(self.btidbf_phase, phase=phase)
        return rows

    @staticmethod
    def compiled(setting: Setting, fn):
        return torch.compile(fn) if setting.mode == "compiled" else fn

    def victim_training(self, s: Setting):
        victim = s.module(Classifier(self.args.victim_arch, 10))
        labels = torch.randint(0, 10, (self.n,), device=self.device)
        loss = self.compiled(s, lambda x: F.cross_entropy(victim(x), labels))
        return train_step(loss, s.sgd(victim.parameters(), lr=0.1), s, fixed(s.images(self.n)))

    def refine(self, s: Setting):
        model = s.module(REFINE(**self.refine_args).model)
        model.augmentation = s.augmentation
        return model.train()

    def refine_training(self, s: Setting, with_data: bool = False):
        model = self.refine(s)
        n = self.n
        batches = endless(s.loader(self.args.data_size, n), self.device) if with_data else fixed(s.images(n))
        loss = self.compiled(s, lambda x: model.loss(x)["loss"])
        return train_step(loss, s.sgd(model.transform_net.parameters()), s, batches)

    def inference(self, s: Setting, defended: bool):
        model = self.refine(s).eval()
        forward, images = self.compiled(s, model if defended else model.victim), s.images(self.n)

        def infer() -> None:
            with torch.inference_mode(), s.autocast():
                forward(images)

        return infer

    def btidbf_phase(self, s: Setting, phase: str):
        model = s.module(BTIDBFPurification(**self.btidbf_args).model).train()
        labels = torch.randint(0, 10, (self.n,), device=self.device)
        part, loss = {
            "mask": (model.feature_mask, lambda x: model.mask_loss(x, labels, 0)["loss"]),
            "generator": (model.generator, lambda x: model.generator_loss(x, 0)["loss"]),
            "purifier": (model.purifier, lambda x: model.defense_loss(x, labels)["loss"]),
        }[phase]
        return train_step(self.compiled(s, loss), s.sgd(part.parameters()), s, fixed(s.images(self.n)))


def measure(args: argparse.Namespace) -> dict:
    """Every row in every mode; the modes of a row run right after each other, so that a drift in
    the machine's load hits them alike."""
    device = torch.device(args.device)
    n, steps = args.batch_size, args.steps
    made = Rows(args, device)
    modes = MODES + (("compiled",) if args.compile else ())
    settings = {mode: Setting(mode, device) for mode in modes}
    rows: dict[str, dict[str, float]] = {}

    def row(name: str, make: Callable[[Setting], Callable[[], object]], compiles: bool = True) -> None:
        """Time ``make(setting)()`` in each mode (``compiled`` only where ``compiles``)."""
        if args.rows and not any(part in name for part in args.rows):
            return
        for mode, setting in settings.items():
            if mode == "compiled" and not compiles:
                continue
            start = time.perf_counter()
            fn = make(setting)
            fn()  # the first call: compilation, where there is one
            rows.setdefault(name, {})
            if mode == "compiled":
                rows[name]["compile_s"] = time.perf_counter() - start
            rows[name][mode] = n / timed(fn, steps, device)
            print(f"{name:42}{mode:>10}{rows[name][mode]:12.1f} images/s", flush=True)

    # the data path alone: loading a batch, and REFINE's augmentation
    row("data: load a batch", lambda s: partial(next, endless(s.loader(args.data_size, n), device)), compiles=False)
    row("data: REFINE augmentation", lambda s: partial(s.augmentation, s.images(n)), compiles=False)
    compute = made.compute()
    victim_row = f"victim training ({args.victim_arch})"
    row(victim_row, compute.pop(victim_row))
    row("REFINE training step", compute.pop("REFINE training step"))
    row("REFINE training step + data path", partial(made.refine_training, with_data=True), compiles=False)
    row("inference: bare victim", partial(made.inference, defended=False))
    row("inference: defended (T, F, M)", partial(made.inference, defended=True))
    for name, make in compute.items():  # BTI-DBF's phases
        row(name, make)

    for values in rows.values():
        values["optimized_over_plain"] = values["optimized"] / values["plain"]
    path_row = rows.get("REFINE training step + data path")
    result = {
        "machine": machine(),
        "device": str(device),
        "optimized_precision": settings["optimized"].precision,
        "optimized_channels_last": settings["optimized"].memory_format == torch.channels_last,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "images_per_s": rows,
        "refine_epoch_s_50k": {m: 50_000 / path_row[m] for m in MODES} if path_row else None,
    }
    if args.profile:
        result["refine_profile"] = profile_refine(made.refine(settings["optimized"]), settings["optimized"], n)
    return result


#: the grid's precisions; each is timed NCHW and NHWC
PRECISIONS = ("32-true", "bf16-mixed")


def grid_cell(precision: str, channels_last: bool) -> str:
    return f"{'fp32' if precision == '32-true' else precision.split('-')[0]} {'NHWC' if channels_last else 'NCHW'}"


def measure_grid(args: argparse.Namespace) -> dict:
    """Each training step in fp32 and bf16 autocast, NCHW and NHWC (the batched data path and the
    fused SGD in all four), and what ``precision: auto`` / ``channels_last: auto`` pick here."""
    device = torch.device(args.device)
    made = Rows(args, device)
    auto = Setting("optimized", device)
    picked = grid_cell(auto.precision, auto.memory_format == torch.channels_last)
    rows: dict[str, dict[str, float]] = {}
    grid = [(p, cl) for p in args.precisions for cl in (False, True)]
    for name, make in made.compute().items():
        if args.rows and not any(part in name for part in args.rows):
            continue
        for precision, channels_last in grid:
            cell = grid_cell(precision, channels_last)
            fn = make(Setting("optimized", device, precision, channels_last))
            rows.setdefault(name, {})[cell] = args.batch_size / timed(fn, args.steps, device, warmup=1)
            print(f"{name:32}{cell:>12}{rows[name][cell]:10.1f} images/s", flush=True)
        best = max(rows[name], key=rows[name].get)
        rows[name] |= {"best": best, "auto": picked, "auto_over_best": rows[name].get(picked, 0) / rows[name][best]}
    return {
        "machine": machine(),
        "device": str(device),
        "cpu_bf16_instructions": cpu_bf16_instructions() if device.type == "cpu" else None,
        "auto": {"precision": auto.precision, "channels_last": auto.memory_format == torch.channels_last},
        "grid": [grid_cell(*cell) for cell in grid],
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "images_per_s": rows,
    }


def grid_markdown(result: dict) -> str:
    cells = result["grid"]
    lines = ["| row | " + " | ".join(f"{c} images/s" for c in cells) + " | auto picks | auto / best |"]
    lines.append("|" + "---|" * (len(cells) + 3))
    for name, values in result["images_per_s"].items():
        rates = " | ".join(f"{values[c]:,.1f}" for c in cells)
        picked = "" if values["auto"] in cells else " (not timed)"
        lines.append(f"| {name} | {rates} | {values['auto']}{picked} | {values['auto_over_best']:.2f} |")
    return "\n".join(lines)


def profile_refine(refine, setting: Setting, batch_size: int, steps: int = 5) -> list[dict]:
    """Top operators (self time) of REFINE's training step in ``setting``."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = setting.sgd(refine.transform_net.parameters())
    step = train_step(lambda x: refine.loss(x)["loss"], optimizer, setting, fixed(setting.images(batch_size)))
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setting.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    key = "self_device_time_total" if setting.device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events)
    top = [
        {"op": e.key, "share": getattr(e, key) / total, "ms_per_step": getattr(e, key) / 1000 / steps}
        for e in events[:15]
    ]
    print("\nREFINE step, top operators by self time:")
    for t in top:
        print(f"  {t['op']:48}{100 * t['share']:6.1f}%{t['ms_per_step']:10.2f} ms/step")
    return top


def markdown(result: dict) -> str:
    """The result as Markdown tables: images/s per row and mode, then the profile."""
    modes = [m for m in ("plain", "optimized", "compiled") if any(m in v for v in result["images_per_s"].values())]
    header = "| row | " + " | ".join(f"{m} images/s" for m in modes) + " | optimized / plain |"
    header += " compile s |" if "compiled" in modes else ""
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, values in result["images_per_s"].items():
        cells = [f"{values[m]:,.0f}" if m in values else "–" for m in modes]
        line = f"| {name} | {' | '.join(cells)} | {values['optimized_over_plain']:.2f} |"
        if "compiled" in modes:
            line += f" {values['compile_s']:.0f} |" if "compile_s" in values else " – |"
        lines.append(line)
    epoch = result["refine_epoch_s_50k"]
    if epoch:
        lines.append("")
        lines.append(
            f"One REFINE epoch of 50,000 images, data path included: {epoch['plain'] / 60:.1f} min plain, "
            f"{epoch['optimized'] / 60:.1f} min optimized."
        )
    if "refine_profile" in result:
        lines += ["", "| REFINE step, top operators (optimized) | share of self time | ms per step |", "|---|---|---|"]
        lines += [
            f"| `{t['op']}` | {100 * t['share']:.1f}% | {t['ms_per_step']:.1f} |" for t in result["refine_profile"]
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refine-config", type=Path, default=Path("configs/refine.yaml"))
    parser.add_argument("--btidbf-config", type=Path, default=Path("configs/btidbf_p.yaml"))
    parser.add_argument("--victim", help="victim file for REFINE and BTI-DBF instead of the configs'")
    parser.add_argument("--victim-arch", default="resnet20", help="the architecture timed for victim training")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed calls per row (after 3 warm-up calls)")
    parser.add_argument("--data-size", type=int, default=50_000, help="images in the timed loaders")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (compile time reported apart)")
    parser.add_argument("--profile", action="store_true", help="profile the optimized REFINE step")
    parser.add_argument(
        "--grid", action="store_true", help="only the training steps in fp32/bf16 x NCHW/NHWC, and auto's pick"
    )
    parser.add_argument("--precisions", nargs="+", default=PRECISIONS, help="the grid's precisions")
    parser.add_argument("--rows", nargs="*", help="time only the rows whose name contains one of these")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.grid:
        result = measure_grid(args)
        print("\n" + grid_markdown(result))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))
            args.out.with_suffix(".md").write_text(grid_markdown(result) + "\n")
        return
    result = measure(args)
    print(f"\n{'':42}{'plain':>10}{'optimized':>11}{'ratio':>8}   (images/s)")
    for name, values in result["images_per_s"].items():
        ratio = values.get("optimized_over_plain")
        print(
            f"{name:42}{values.get('plain', 0):10.1f}{values.get('optimized', 0):11.1f}"
            f"{(f'{ratio:8.2f}' if ratio else ''):>8}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        args.out.with_suffix(".md").write_text(markdown(result) + "\n")


if __name__ == "__main__":
    main()
