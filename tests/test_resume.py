"""Exact resume: a run killed with SIGKILL and resumed from last.ckpt ends with the weights and
metrics of a run that was never interrupted (CPU, same seed; issue 6)."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lightning_defense.attacks import BadNets
from lightning_defense.victims import Classifier, VictimMetadata, save_victim

SOURCE = {"class_path": "SyntheticDataModule", "init_args": {"train_per_class": 24, "test_per_class": 4}}


def victim_trainer(tmp_path: Path) -> dict:
    source = {**SOURCE, "init_args": {**SOURCE["init_args"], "batch_size": 16, "attack": BadNets(target=1).config()}}
    return {"model": {"class_path": "VictimTask", "init_args": {"arch": "resnet20", "lr": 0.05}}, "data": source}


def refine(tmp_path: Path) -> dict:
    victim = tmp_path / "victim.safetensors"
    torch.manual_seed(0)
    save_victim(victim, Classifier("resnet20", 10), VictimMetadata("resnet20", 10, attack=BadNets().config()))
    model = {"victim": str(victim), "encoder_depth": 3, "decoder_channels": [16, 8, 4], "contrastive_weight": 1.0}
    source = copy.deepcopy(SOURCE)  # tests change it: never the module's
    data = {"source": source, "aux_data": {"class_path": "SeenData"}, "victim": str(victim), "batch_size": 16}
    return {
        "model": {"class_path": "REFINE", "init_args": model},
        "data": {"class_path": "DefenseDataModule", "init_args": data},
    }


def btidbf(tmp_path: Path) -> dict:
    parts = refine(tmp_path)
    settings = {"rounds": 2, "mask_epochs": 1, "generator_epochs": 1, "defense_epochs": 1}
    settings["checkpoint_every_n_epochs"] = 1
    model = {"victim": parts["model"]["init_args"]["victim"], "encoder_depth": 3, "decoder_channels": [16, 8, 4]}
    data = {**parts["data"], "init_args": {**parts["data"]["init_args"], "aux_data": {"class_path": "ReservedData"}}}
    data["init_args"]["source"] = {**SOURCE, "init_args": {**SOURCE["init_args"], "reserved_fraction": 0.5}}
    return {"model": {"class_path": "BTIDBFUnlearning", "init_args": {**model, **settings}}, "data": data}


def finetune(tmp_path: Path) -> dict:
    parts = btidbf(tmp_path)
    augmentation = {"class_path": "CropFlip"}  # random draws that must repeat after the resume
    data = {**parts["data"], "init_args": {**parts["data"]["init_args"], "augmentation": augmentation}}
    model = {"class_path": "FineTune", "init_args": {"victim": parts["model"]["init_args"]["victim"]}}
    return {"model": model, "data": data}


def neural_cleanse(tmp_path: Path) -> dict:
    parts = finetune(tmp_path)  # labelled reserved data, augmented
    # threshold 0 flags the smallest mask: the run crosses from inversion to unlearning at epoch 2
    settings = {"inversion_epochs": 2, "anomaly_threshold": 0.0, "cost_patience": 1, "image_size": [32, 32]}
    parts["model"] = {"class_path": "NeuralCleanse", "init_args": {**parts["model"]["init_args"], **settings}}
    return parts


def write_config(tmp_path: Path, name: str, parts: dict) -> Path:
    config = {
        "seed_everything": 0,
        **parts,
        "trainer": {
            "max_epochs": 4,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path / name), "name": "run"}},
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def lightning(*args: str, cwd: Path) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lightning_defense", *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def final_epoch(folder: Path) -> int:
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]


def final_state(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.parametrize(
    "make",
    [victim_trainer, refine, btidbf, finetune, neural_cleanse],
    ids=["victim_trainer", "refine", "btidbf_u", "finetune", "neural_cleanse"],
)
def test_a_run_killed_mid_epoch_and_resumed_ends_as_if_never_interrupted(make, tmp_path):
    parts = make(tmp_path)
    whole = write_config(tmp_path, "whole", parts)
    done = lightning("fit", "--config", str(whole), cwd=tmp_path)
    assert done.wait(timeout=600) == 0, done.stderr.read()[-3000:]

    killed = write_config(tmp_path, "killed", parts)
    run = lightning("fit", "--config", str(killed), cwd=tmp_path)
    first = tmp_path / "killed" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    while not first.is_file() and run.poll() is None:  # kill in the epoch after the first checkpoint
        time.sleep(0.02)
    time.sleep(0.3)
    assert run.poll() is None, "the run ended before it could be killed"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    resumed_from = torch.load(first, weights_only=True)["epoch"]
    assert resumed_from < final_epoch(tmp_path / "whole" / "run" / "version_0")
    again = lightning("fit", "--config", str(killed), "--ckpt_path", str(first), cwd=tmp_path)
    assert again.wait(timeout=600) == 0, again.stderr.read()[-3000:]

    expected = final_state(tmp_path / "whole" / "run" / "version_0")
    resumed = final_state(tmp_path / "killed" / "run" / "version_1")
    assert expected.keys() == resumed.keys()
    different = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert not different, f"resumed from epoch {resumed_from}, these differ: {different[:5]}"
