"""The console script end to end, on tiny configs the tests write (torchgeo style)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import RunsCode

from lightning_defense.cli import main
from lightning_defense.victims import load_victim, read_victim_metadata

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, **data_overrides) -> Path:
    data = {
        "train_per_class": 8,
        "test_per_class": 4,
        "batch_size": 16,
        "reserved_fraction": 0.1,
        "attack": {"class_path": "BadNets", "init_args": {"target": 1, "poison_rate": 0.2}},
    } | data_overrides
    config = {
        "seed_everything": 0,
        "model": {"class_path": "VictimTask", "init_args": {"arch": "resnet20", "num_classes": 10}},
        "data": {"class_path": "SyntheticDataModule", "init_args": data},
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 2,
            "limit_test_batches": 2,
            "log_every_n_steps": 1,
            "enable_model_summary": False,
            "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": "tiny"}},
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _synthetic_test_set():
    from lightning_defense.data import SyntheticDataModule

    dm = SyntheticDataModule(train_per_class=8, test_per_class=4, reserved_fraction=0.1)
    dm.setup()
    return dm.test_set


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "LIGHTNING_DEFENSE_TRACEBACK": ""}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_console_script_fit_then_test_and_the_checkpoint_is_a_frozen_victim(tmp_path):
    config = tiny_config(tmp_path)
    fit = run([str(BIN / "lightning"), "fit", "--config", str(config)], tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny" / "version_0"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file() and (run_dir / "victim.safetensors").is_file()
    metrics = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/ba", "val/asr", "train/loss"} <= set(metrics)

    images = torch.rand(4, 3, 32, 32)
    outputs = []
    for path in (last, run_dir / "victim.safetensors"):
        victim = load_victim(path, num_classes=10)
        outputs.append(victim(images))
        assert not victim.training and not any(p.requires_grad for p in victim.parameters())
        attack = read_victim_metadata(path).attack
        assert attack["init_args"]["target"] == 1 and attack["class_path"].endswith("BadNets")
    assert torch.allclose(*outputs)  # the exported file is the checkpoint's network
    # the Lightning checkpoint itself holds nothing that needs unpickling
    assert "state_dict" in torch.load(last, weights_only=True)

    test = run([str(BIN / "lightning"), "test", "--config", str(config), "--ckpt_path", str(last)], tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/ba" in test.stdout and "test/asr" in test.stdout
    assert "epoch 0/0" in fit.stderr and "val/asr" in fit.stderr  # progress lines when not on a terminal

    predict = run(
        [
            str(BIN / "lightning"),
            "predict",
            "--config",
            str(config),
            "--ckpt_path",
            str(last),
            "--trainer.callbacks+=PredictionWriter",
            "--trainer.precision",  # compared with fp32 predictions below (auto is bf16 on CPUs that have it)
            "32-true",
        ],
        tmp_path,
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    (written,) = (tmp_path / "runs").rglob("predictions.csv")
    rows = written.read_text().splitlines()
    assert rows[0] == "index,prediction" and len(rows) == 1 + 40  # the 40 clean test images
    victim = load_victim(last)
    test_images = torch.stack([image for image, _ in _synthetic_test_set()])
    expected = victim(test_images).argmax(1).tolist()
    assert [int(r.split(",")[1]) for r in rows[1:]] == expected


@pytest.mark.parametrize(
    "command",
    [["lightning-defense", "--help"], [sys.executable, "-m", "lightning_defense", "fit", "--help"]],
)
def test_other_entry_points(command, tmp_path):
    if command[0] == "lightning-defense":
        command = [str(BIN / command[0]), *command[1:]]
    result = run(command, tmp_path)
    assert result.returncode == 0 and "fit" in result.stdout


def test_main_returns_none_for_the_console_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning"])
    assert main(["fit", "--config", str(tiny_config(tmp_path)), "--trainer.enable_progress_bar", "false"]) is None


def test_version_and_help_say_what_this_tool_is(capsys):
    import lightning

    main(["--version"])
    printed = capsys.readouterr().out
    assert printed.startswith("lightning-defense 0.") and f"torch {torch.__version__}" in printed
    assert f"lightning {lightning.__version__}" in printed
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "defend image classifiers against backdoors" in printed
    assert all(f"`{command}`" in printed for command in ("study", "wrap", "shipped"))


def test_class_count_mismatch_is_one_clear_line(tmp_path):
    config = tiny_config(tmp_path, num_classes=4)
    result = run([str(BIN / "lightning"), "fit", "--config", str(config)], tmp_path)
    assert result.returncode == 2
    assert "Class-count mismatch" in result.stderr and "num_classes: 4" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_poison_rate_is_one_clear_line(tmp_path):
    config = tiny_config(tmp_path, attack={"class_path": "BadNets", "init_args": {"poison_rate": 1.5}})
    result = run([str(BIN / "lightning"), "fit", "--config", str(config)], tmp_path)
    assert result.returncode != 0 and "poison_rate must be in (0, 1]" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_root_is_one_clear_line(tmp_path):
    config = yaml.safe_load(tiny_config(tmp_path).read_text())
    config["data"] = {"class_path": "CIFAR10DataModule", "init_args": {"root": str(tmp_path / "none")}}
    path = tmp_path / "cifar.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run([str(BIN / "lightning"), "fit", "--config", str(path)], tmp_path)
    assert result.returncode == 2 and "CIFAR-10 not found" in result.stderr and "tar -xzf" in result.stderr
    assert "Traceback" not in result.stderr


# studies are grids of fit configs, checked in test_study.py
SHIPPED = sorted(c for c in (REPO / "configs").glob("**/*.yaml") if c.parent.name != "studies")


LAYER_BASES = {
    "refine": "refine.yaml",
    "btidbf": "btidbf_p.yaml",
    "finetune": "finetune.yaml",
    "scaling": "refine.yaml",
    "bdmae": "bdmae.yaml",
    "tmr": "tmr.yaml",
    "shrinkpad": "shrinkpad.yaml",
    "neural_cleanse": "neural_cleanse.yaml",
    "tinyimagenet": "refine.yaml",
}


def config_command(config: Path) -> list[str]:
    """Files under configs/<defense>/ are layers on that defense's embedded default, unless they name
    their own data module (a whole config, e.g. configs/bdmae/mae.yaml)."""
    whole = "class_path" in (yaml.safe_load(config.read_text()).get("data") or {})
    base = None if whole else LAYER_BASES.get(config.parent.name)
    layers = ["--config", str(REPO / "configs" / base)] if base else []
    return ["fit", *layers, "--config", str(config), "--print_config"]


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_config_parses(config, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lightning"])
    with pytest.raises(SystemExit) as exit_info:
        main(config_command(config))
    assert exit_info.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("lightning_defense.")
    layer = yaml.safe_load(config.read_text())
    for key, value in (layer.get("model", {}).get("init_args") or {}).items():
        assert printed["model"]["init_args"][key] == value


def test_same_seed_same_victim(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setattr(sys, "argv", ["lightning"])
    weights = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.chdir(folder)
        config = str(tiny_config(folder))
        main(["fit", "--config", config, "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false"])
        weights.append(load_file(str(folder / "runs" / "tiny" / "version_0" / "victim.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(weights[0]["network.fc.weight"], weights[2]["network.fc.weight"])


def test_ckpt_path_is_never_unpickled(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, evil)
    config = str(tiny_config(tmp_path))
    result = run([str(BIN / "lightning"), "test", "--config", config, "--ckpt_path", str(evil)], tmp_path)
    assert result.returncode == 2 and "pickled Python objects" in result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()
    # asking Lightning to unpickle (it would for a remote checkpoint by default) is refused as well
    harmless = tmp_path / "harmless.ckpt"
    torch.save({"state_dict": {}}, harmless)
    forced = run(
        [str(BIN / "lightning"), "test", "--config", config, "--ckpt_path", str(harmless), "--weights_only", "false"],
        tmp_path,
    )
    assert forced.returncode == 2 and "only loads weights" in forced.stderr


def test_victim_training_under_ddp_writes_the_victim_once(tmp_path):
    """Two gloo processes on CPU; files are written by rank 0 after collective calls on all ranks."""
    config = str(tiny_config(tmp_path))
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    result = run([str(BIN / "lightning"), "fit", "--config", config, *ddp], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("Victim written to") == 1
    victim = load_victim(tmp_path / "runs" / "tiny" / "version_0" / "victim.safetensors")
    assert victim.frozen
    # without a logger, the ranks Lightning starts take rank 0's run folder (they rerun the command)
    result = run([str(BIN / "lightning"), "fit", "--config", config, *ddp, "--trainer.logger", "false"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (tmp_path / "runs" / "no_logger").iterdir() if p.is_dir()] == ["version_0"]
    assert load_victim(tmp_path / "runs" / "no_logger" / "version_0" / "victim.safetensors").frozen


def test_victim_training_runs_under_bf16_autocast(tmp_path):
    config = str(tiny_config(tmp_path))
    result = run([str(BIN / "lightning"), "fit", "--config", config, "--trainer.precision", "bf16-mixed"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_victim(tmp_path / "runs" / "tiny" / "version_0" / "victim.safetensors").frozen


@pytest.mark.parametrize(
    "attack",
    [
        {"class_path": "BATT", "init_args": {"target": 1}},
        {"class_path": "SIG", "init_args": {"target": 1, "poison_rate": 0.5}},
        {"class_path": "BppAttack", "init_args": {"target": 1, "negative_ratio": 0.1}},
        {"class_path": "PhysicalBA", "init_args": {"target": 1}},
    ],
    ids=lambda a: a["class_path"],
)
def test_each_attack_trains_a_tiny_victim_through_the_cli(attack, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning"])
    main(["fit", "--config", str(tiny_config(tmp_path, attack=attack)), "--trainer.enable_progress_bar", "false"])
    victim = tmp_path / "runs" / "tiny" / "version_0" / "victim.safetensors"
    stored = read_victim_metadata(victim).attack
    assert stored["class_path"].endswith(attack["class_path"]) and stored["init_args"]["target"] == 1
    header = (victim.parent / "metrics.csv").read_text().splitlines()[0]
    assert "val/asr" in header and "val/ba" in header


def test_a_run_stopped_by_sigterm_exits_nonzero_so_it_is_not_taken_for_finished(tmp_path):
    # Lightning ends a SIGTERM'd fit cleanly with SystemExit(None), i.e. exit 0: a sweep or a scheduler
    # would then count the run as finished and never resume it
    config = tiny_config(tmp_path)
    command = [str(BIN / "lightning"), "fit", "--config", str(config), "--trainer.max_epochs", "1000"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "LIGHTNING_DEFENSE_TRACEBACK": ""}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    record = tmp_path / "runs" / "tiny" / "version_0" / "epochs.jsonl"
    deadline = time.monotonic() + 240
    while not (record.is_file() and record.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in stderr and "--ckpt_path last" in stderr and "Traceback" not in stderr
    assert (tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt").is_file()
