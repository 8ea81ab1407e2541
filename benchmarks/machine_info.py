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
