"""Settings that follow the machine, not the config: precision, memory layout and CPU threads.

bf16 autocast pays only where the hardware computes bf16: on a CPU without AVX-512 BF16 or AMX,
PyTorch emulates it and a training step runs 10-40x slower than in fp32
(``benchmarks/PERFORMANCE.md``). channels_last (NHWC) was measured to pay on CPUs in fp32 and
bf16 alike, and pays on GPUs with 16-bit convolutions (tensor cores). So ``precision: auto`` and
``channels_last: auto`` (:class:`~lightning_defense.training.trainer.DefenseTrainer`) are resolved here at
start-up, and an explicit value always wins.

Threads: each process of a run gets the cores it may use divided by the processes that share them,
unless ``OMP_NUM_THREADS`` says otherwise, so two DDP ranks or two study cells do not each start a
thread per core and fight over them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

#: precisions whose convolutions run in 16 bits (Lightning's names)
HALF_PRECISIONS = ("bf16-mixed", "bf16-true", "16-mixed", "16-true", "bf16", "16", 16)


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``precision: auto`` resolved to, and why (printed at start-up)."""

    precision: str
    reason: str


#: the CPU's bf16 instruction sets PyTorch's kernels use: name, torch's check, the kernel's flag
BF16_INSTRUCTIONS = (
    ("AVX-512 BF16", "_is_avx512_bf16_supported", "avx512_bf16"),
    ("AMX", "_is_amx_tile_supported", "amx_bf16"),
)


def cpu_bf16_instructions() -> list[str]:
    """The names of this CPU's bf16 instruction sets (:data:`BF16_INSTRUCTIONS`); torch < 2.5 has
    no checks of its own, so there the kernel's CPU flags are read."""
    flags = None
    found = []
    for name, function, flag in BF16_INSTRUCTIONS:
        check = getattr(torch.cpu, function, None)
        if check is not None:
            supported = bool(check())
        else:
            flags = _cpu_flags() if flags is None else flags
            supported = flag in flags
        if supported:
            found.append(name)
    return found


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def device_type(accelerator: object = "auto") -> str:
    """``cpu``, ``cuda`` or ``mps``: where a Trainer with this ``accelerator`` will compute."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name in ("auto", "gpu"):
        return "cuda" if cuda else "mps" if mps else "cpu"
    if "cuda" in name:
        return "cuda"
    if "mps" in name:
        return "mps"
    return "cpu"


def cuda_device(index: int = 0, without_initializing: bool = False) -> tuple[str, tuple[int, int]]:
    """Name and compute capability of CUDA device ``index``. ``without_initializing`` asks a
    short-lived subprocess, so that this process can still fork DDP ranks (``ddp_fork``), which
    CUDA forbids once initialized."""
    if not without_initializing:
        return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))
    code = (
        "import torch; i = int(__import__('sys').argv[1]); "
        "print(torch.cuda.get_device_name(i)); print(*torch.cuda.get_device_capability(i))"
    )
    lines = subprocess.run(
        [sys.executable, "-c", code, str(index)], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    major, minor = lines[-1].split()
    return lines[-2], (int(major), int(minor))


def auto_precision(device: str, cuda_index: int = 0, fork_safe: bool = False) -> PrecisionChoice:
    """The fastest precision that keeps training stable on ``device`` (``cpu``, ``cuda``, ``mps``);
    for CUDA, of device ``cuda_index`` (``fork_safe``: see :func:`cuda_device`)."""
    if device == "cuda":
        name, capability = cuda_device(cuda_index, without_initializing=fork_safe)
        if capability >= (8, 0):
            return PrecisionChoice("bf16-mixed", f"{name} computes bf16 natively")
        return PrecisionChoice(
            "16-mixed", f"{name} has no native bf16 (compute capability below 8.0); fp16 with loss scaling"
        )
    if device == "cpu":
        found = cpu_bf16_instructions()
        if found:
            return PrecisionChoice("bf16-mixed", f"this CPU has {' and '.join(found)}")
        return PrecisionChoice(
            "32-true",
            "this CPU has no bf16 instructions (AVX-512 BF16 or AMX); bf16 would be emulated, 10-25x slower",
        )
    return PrecisionChoice("32-true", f"mixed precision on {device} is not measured here")


def is_half(precision: object) -> bool:
    """Whether ``precision`` (a Lightning name) runs convolutions in 16 bits."""
    return precision in HALF_PRECISIONS


def uses_channels_last(trainer: object) -> bool:
    """The memory layout for a module run by ``trainer``: its ``channels_last`` setting where it has
    one (:class:`~lightning_defense.training.trainer.DefenseTrainer`), else where NHWC was measured to pay:
    on a CPU in fp32 and bf16 alike (oneDNN's NHWC kernels), and on a GPU with 16-bit precision
    (tensor cores); a GPU in fp32 keeps PyTorch's NCHW."""
    setting = getattr(trainer, "channels_last", "auto")
    if isinstance(setting, bool):
        return setting
    device = device_type(getattr(trainer, "accelerator", "cpu"))
    return device == "cpu" or is_half(getattr(trainer, "precision", "32-true"))


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup (container) CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def threads_per_process(processes: int, cores: int | None = None) -> int:
    """Intra-op threads for each of ``processes`` processes sharing ``cores`` (at least one)."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, processes))


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str
    warning: str | None = None


def configure_threads(processes: int) -> ThreadChoice:
    """Set torch's intra-op threads for one of ``processes`` processes of a run on this machine.

    ``OMP_NUM_THREADS``, when set, wins (the study runner sets it for its cells). Otherwise the
    choice is also exported as ``OMP_NUM_THREADS``, so processes this one starts (spawned DDP
    ranks, DataLoader workers) inherit it instead of starting a thread per core each.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return ThreadChoice(torch.get_num_threads(), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    cores = available_cores()
    threads = threads_per_process(processes, cores)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    reason = f"{cores} cores / {processes} process{'es' if processes > 1 else ''}"
    warning = None
    if processes > cores:
        warning = (
            f"{processes} processes share {cores} cores: they will slow each other down. Use fewer "
            "processes per machine (CPU DDP: --trainer.devices), or give the machine more cores."
        )
    elif (load := _load_average()) is not None and load >= cores:
        warning = (
            f"The machine is already busy (load average {load:.1f} on {cores} cores): this run's {threads} "
            "threads will share the cores with what runs now, and both slow down. Run one after the other, "
            "or give each run its share of the cores with OMP_NUM_THREADS (`lightning-defense study --jobs N` "
            "splits them itself)."
        )
    return ThreadChoice(threads, reason, warning)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def worker_environment(jobs: int, threads: int = 0) -> dict[str, str]:
    """The environment for each of ``jobs`` runs started at once (study cells, sweep rows):
    ``OMP_NUM_THREADS`` is ``threads`` when given, else the caller's own ``OMP_NUM_THREADS``, else
    the cores divided between the jobs, so the runs never oversubscribe the machine."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    elif not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(threads_per_process(jobs))
    outer = env["OMP_NUM_THREADS"].split(",")[0].strip()  # OpenMP allows a list per nesting level
    cores, wanted = available_cores(), jobs * (int(outer) if outer.isdigit() else 1)
    if wanted > cores:
        warnings.warn(
            f"{jobs} runs x {env['OMP_NUM_THREADS']} threads ask for {wanted} threads on {cores} cores: the runs "
            "will slow each other down. Lower --jobs or --threads (0 splits the cores between the jobs).",
            stacklevel=2,
        )
    return env
