"""Precision, memory layout and threads chosen from the (mocked) hardware."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins import DoublePrecision

from lightning_defense import hardware
from lightning_defense.cli import build_cli
from lightning_defense.defenses import REFINE
from lightning_defense.training.trainer import DefenseTrainer
from lightning_defense.training.victim_task import VictimTask

VICTIM = str(Path(__file__).resolve().parents[1] / "checkpoints" / "cifar10_resnet20_badnets.safetensors")


@pytest.fixture
def cpu(monkeypatch):
    """A CPU with the given bf16 instruction sets (none: AVX2 only), and no GPU."""

    def make(*instructions: str) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
        for name, check in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx", "_is_amx_tile_supported")):
            monkeypatch.setattr(torch.cpu, check, lambda name=name: name in instructions, raising=False)

    return make


@pytest.fixture
def cuda(monkeypatch):
    def make(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: f"GPU sm_{capability[0]}{capability[1]}")

    return make


def test_a_cpu_without_bf16_instructions_trains_in_fp32(cpu):
    cpu()
    choice = hardware.auto_precision(hardware.device_type("auto"))
    assert choice.precision == "32-true" and "no bf16 instructions" in choice.reason


@pytest.mark.parametrize(("instruction", "named"), [("avx512_bf16", "AVX-512 BF16"), ("amx", "AMX")])
def test_a_cpu_with_bf16_instructions_trains_in_bf16(cpu, instruction, named):
    cpu(instruction)
    choice = hardware.auto_precision("cpu")
    assert choice.precision == "bf16-mixed" and named in choice.reason


def test_older_torch_without_the_checks_reads_the_cpu_flags(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: {"avx2", "amx_bf16", "amx_tile"})
    assert hardware.cpu_bf16_instructions() == ["AMX"]
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert hardware.auto_precision("cpu").precision == "32-true"


@pytest.mark.parametrize(
    ("capability", "expected"), [((9, 0), "bf16-mixed"), ((8, 0), "bf16-mixed"), ((7, 5), "16-mixed")]
)
def test_cuda_uses_bf16_where_native_else_fp16(cuda, capability, expected):
    cuda(capability)
    assert hardware.device_type("auto") == hardware.device_type("gpu") == "cuda"
    assert hardware.device_type("cpu") == "cpu"
    assert hardware.auto_precision("cuda").precision == expected


def test_the_trainer_resolves_auto_and_an_explicit_precision_wins(cpu, capsys):
    cpu()
    quiet = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False}
    trainer = DefenseTrainer(**quiet)
    assert trainer.precision == "32-true" and trainer.channels_last is True  # NHWC pays on CPUs in fp32 too
    explicit = DefenseTrainer(precision="bf16-mixed", **quiet)
    assert explicit.precision == "bf16-mixed" and explicit.channels_last is True
    forced = DefenseTrainer(precision="32-true", channels_last=False, **quiet)
    assert forced.precision == "32-true" and forced.channels_last is False
    cpu("amx")
    assert DefenseTrainer(**quiet).precision == "bf16-mixed"
    # a precision plugin decides alone (Lightning refuses a precision beside it)
    plugin = DefenseTrainer(plugins=[DoublePrecision()], **quiet)
    assert plugin.precision == "64-true"


def test_the_cli_prints_its_choice_and_the_command_line_overrides_the_config(cpu, tmp_path, monkeypatch, caplog):
    cpu("avx512_bf16")
    monkeypatch.setattr(sys, "argv", ["lightning"])
    monkeypatch.chdir(tmp_path)  # without a logger the run's folder is made under ./runs
    config = tmp_path / "auto.yaml"
    config.write_text("trainer:\n  precision: auto\n  logger: false\n")
    model = ["--model", "lightning.pytorch.demos.boring_classes.BoringModel"]
    data = ["--data", "lightning.pytorch.demos.boring_classes.BoringDataModule"]
    with caplog.at_level("INFO"):
        auto = build_cli(["--config", str(config), *model, *data], run=False)
    assert auto.trainer.precision == "bf16-mixed" and auto.trainer.channels_last
    assert "Precision auto -> bf16-mixed: this CPU has AVX-512 BF16; channels_last on." in caplog.text
    given = ["--trainer.precision", "32", "--trainer.channels_last", "false"]
    given = build_cli(["--config", str(config), *given, *model, *data], run=False)
    assert given.trainer.precision == "32-true" and not given.trainer.channels_last


def test_the_layout_rule_per_device():
    """NHWC on CPUs in any precision and on GPUs in 16 bits; NCHW for a GPU in fp32."""

    class Fake:
        def __init__(self, accelerator, precision):
            self.accelerator, self.precision = type(accelerator, (), {})(), precision

    assert hardware.uses_channels_last(Fake("CPUAccelerator", "32-true"))
    assert hardware.uses_channels_last(Fake("CPUAccelerator", "bf16-mixed"))
    assert hardware.uses_channels_last(Fake("CUDAAccelerator", "16-mixed"))
    assert not hardware.uses_channels_last(Fake("CUDAAccelerator", "32-true"))


@pytest.mark.parametrize("channels_last", [False, True])
def test_modules_take_the_layout_of_the_trainer(channels_last, tmp_path):
    """Modules convert in `setup` to the Trainer's layout; a module's own setting wins."""
    trainer = DefenseTrainer(
        accelerator="cpu",
        channels_last=channels_last,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    defense, victim = REFINE(VICTIM, encoder_name="resnet18", encoder_depth=2, decoder_channels=(8, 4)), VictimTask()
    forced = VictimTask(channels_last=not channels_last)  # a module's own setting wins (older configs name it)
    for module in (defense, victim, forced):
        module.trainer = trainer
        trainer.strategy.connect(module)
    for module in (defense, victim, forced):
        module.setup("validate")
    forced_weight = next(p for p in forced.classifier.parameters() if p.dim() == 4)
    assert forced_weight.is_contiguous(memory_format=torch.channels_last) is not channels_last
    for network in (defense.model, victim.classifier):
        weight = next(p for p in network.parameters() if p.dim() == 4)
        assert weight.is_contiguous(memory_format=torch.channels_last) is channels_last
        assert weight.is_contiguous() is not channels_last


@pytest.fixture
def cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware, "_load_average", lambda: 0.0)

    def make(count: int) -> None:
        monkeypatch.setattr(hardware, "available_cores", lambda: count)

    return make


def test_one_process_uses_every_core(cores):
    cores(4)
    choice = hardware.configure_threads(1)
    assert choice.threads == torch.get_num_threads() == 4 and os.environ["OMP_NUM_THREADS"] == "4"
    assert choice.warning is None


def test_ddp_ranks_share_the_cores(cores, tmp_path, monkeypatch):
    """Two CPU DDP ranks from the CLI: one thread each on two cores (the launch itself is not run)."""
    cores(2)
    monkeypatch.setattr(sys, "argv", ["lightning"])
    build_cli(
        [
            "--model", "lightning.pytorch.demos.boring_classes.BoringModel",
            "--data", "lightning.pytorch.demos.boring_classes.BoringDataModule",
            "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
        ],
        run=False,
    )  # fmt: skip
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert hardware.configure_threads(3).warning.startswith("3 processes share 2 cores")


def test_a_set_omp_num_threads_wins(cores, monkeypatch):
    cores(8)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    torch.set_num_threads(3)
    choice = hardware.configure_threads(1)
    assert choice.threads == 3 and choice.reason == "OMP_NUM_THREADS=3"


def test_a_busy_machine_is_named(cores, monkeypatch):
    cores(2)
    monkeypatch.setattr(hardware, "_load_average", lambda: 2.5)
    warning = hardware.configure_threads(1).warning
    assert warning and "load average 2.5 on 2 cores" in warning and "OMP_NUM_THREADS" in warning


def test_study_workers_split_the_cores(cores, monkeypatch):
    from lightning_defense.study import Study

    cores(2)
    seen = []
    monkeypatch.setattr(Study, "write_cell_config", lambda self, cell, out, env: seen.append(env) or out / "x.yaml")
    monkeypatch.setattr("lightning_defense.study.running.run_logged", lambda *a, **k: seen.append(a[3]) or 1)
    monkeypatch.setattr("lightning_defense.study.running.write_results", lambda *a: None)
    study = Study(victim=VICTIM, defenses={"a": [], "b": []}, aux_data={"seen": {}}, calibration=None, jobs=2)
    study.run()
    assert len(seen) == 4 and all(env["OMP_NUM_THREADS"] == "1" for env in seen)
    assert hardware.worker_environment(1)["OMP_NUM_THREADS"] == "2"
    with pytest.warns(UserWarning, match="2 runs x 2 threads ask for 4 threads on 2 cores"):
        assert hardware.worker_environment(2, threads=2)["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert hardware.worker_environment(1)["OMP_NUM_THREADS"] == "1"


def test_a_cgroup_quota_caps_the_cores(monkeypatch, tmp_path):
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    real = hardware.Path
    monkeypatch.setattr(hardware, "Path", lambda p: quota if p == "/sys/fs/cgroup/cpu.max" else real(p))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert hardware.available_cores() == 1
    quota.write_text("max 100000\n")
    assert hardware.available_cores() == 4
