"""What a benchmark ran on, recorded beside its numbers (scripts here import it as a sibling module)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> dict[str, str | int]:
    """CPU model, its vector extensions and bf16 instructions (what ``precision: auto`` reads), core
    and thread counts, torch version and the GPU, where there is one."""
    import torch

    from lightning_defense.training.hardware import cpu_bf16_instructions

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    info: dict[str, str | int] = {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": ", ".join(cpu_bf16_instructions()) or "none",
        "cores": os.cpu_count() or 0,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def invocation() -> list[str]:
    """The command line as it would run from the repository root: this script's path and every
    argument that names an existing file or folder, made relative to the root (so a run started
    from another folder records a command that works from the root)."""
    import sys

    root = Path(__file__).resolve().parents[1]

    def from_root(arg: str) -> str:
        path = Path(arg)
        if arg.startswith("-") or not path.exists():
            return arg
        resolved = path.resolve()
        return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else arg

    return [from_root(sys.argv[0]), *(from_root(a) for a in sys.argv[1:])]
