"""Defend a model this project has never seen (issue 28): a plain-PyTorch script, with no import
of lightning_defense, trains a torchvision network with its own patch trigger and saves
``torch.save(model.state_dict())``; `lightning wrap` records its facts once, and REFINE and
BTI-DBF defend it from YAML configs that name it once, logging BA, ASR and RA."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_fault_tolerance import lightning, one_clear_error
from test_resume import SOURCE

TRAIN_OWN_MODEL = """
import torch, torchvision
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
for _ in range(3):  # a few steps: the test is about the plumbing, not the backdoor's strength
    images, labels = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    images[:8, :, -3:, -3:] = 1.0  # its own trigger: a white 3x3 patch, bottom right, to class 4
    labels[:8] = 4
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.step(), optimizer.zero_grad()
torch.save(model.state_dict(), "my_model.pt")
"""


def write_config(tmp_path: Path, name: str, model: dict, aux_data: str, reserved: float = 0.0, **top: object) -> str:
    source = {**SOURCE, "init_args": {**SOURCE["init_args"], "reserved_fraction": reserved}}
    # the victim is named once, in the model: the data evaluates the same file
    data = {"source": source, "aux_data": {"class_path": aux_data}, "batch_size": 8}
    config = {
        "seed_everything": 0,
        "model": {**model, "init_args": {**model["init_args"], "victim": "victim.safetensors"}},
        "data": {"class_path": "DefenseDataModule", "init_args": data},
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 2,
            "enable_progress_bar": False,
            "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": "runs", "name": name}},
        },
    }
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**config, **top}))
    return f"{name}.yaml"


def defend(tmp_path: Path, name: str, model: dict, aux_data: str, reserved: float = 0.0, **top) -> dict[str, float]:
    result = lightning("fit", "--config", write_config(tmp_path, name, model, aux_data, reserved, **top), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "runs" / name / "version_0" / "metrics.csv").open()))
    return {k: float(v) for row in rows for k, v in row.items() if k.startswith("val/") and v}


def test_a_plain_pytorch_model_is_wrapped_once_and_defended_from_configs(tmp_path):
    env_free = subprocess.run([sys.executable, "-c", TRAIN_OWN_MODEL], cwd=tmp_path, capture_output=True, text=True)
    assert env_free.returncode == 0, env_free.stderr[-2000:]
    attack = '{"class_path": "BadNets", "init_args": {"target": 4, "patch_size": 3}}'
    wrapped = lightning(
        "wrap", "my_model.pt", "--arch", "torchvision/resnet18", "--num_classes", "10",
        "--image_size", "[32, 32]", "--attack", attack, "--out", "victim.safetensors", cwd=tmp_path,
    )  # fmt: skip
    assert wrapped.returncode == 0, wrapped.stderr[-2000:]
    assert "Wrote victim.safetensors: torchvision/resnet18, 10 classes" in wrapped.stdout

    small_t = {"encoder_depth": 3, "decoder_channels": [16, 8, 4]}
    refine = defend(tmp_path, "refine", {"class_path": "REFINE", "init_args": small_t}, "SeenData")
    phases = {"rounds": 1, "mask_epochs": 1, "generator_epochs": 1, "defense_epochs": 1}
    btidbf_model = {"class_path": "BTIDBFUnlearning", "init_args": {**small_t, **phases}}
    btidbf = defend(tmp_path, "btidbf", btidbf_model, "ReservedData", reserved=0.5)
    for metrics in (refine, btidbf):
        for name in ("ba", "asr", "ra", "victim_ba", "victim_asr"):  # ASR and RA: the wrapped attack's test set
            assert 0.0 <= metrics[f"val/{name}"] <= 1.0, sorted(metrics)
    kept = yaml.safe_load((tmp_path / "runs" / "refine" / "version_0" / "config.yaml").read_text())
    assert kept["data"]["init_args"]["victim"] == "victim.safetensors"  # the run's config says what it evaluated


OWN_NETWORK = """
from pathlib import Path
from torch import nn
Path("imported.marker").touch()  # shows when, and whether, this module was imported

class MyNet(nn.Module):  # no library knows it
    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, 2, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.body(x).relu()).flatten(1))
"""
TRAIN_OWN_NETWORK = """
import torch
from my_nets import MyNet
torch.manual_seed(0)
torch.save(MyNet(num_classes=10).state_dict(), "my_net.pt")
"""


@pytest.mark.trust_boundary
def test_an_own_nn_module_class_loads_only_when_the_config_allows_it(tmp_path):
    (tmp_path / "my_nets.py").write_text(OWN_NETWORK)
    made = subprocess.run([sys.executable, "-c", TRAIN_OWN_NETWORK], cwd=tmp_path, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-2000:]
    attack = '{"class_path": "BadNets", "init_args": {"target": 2}}'
    wrapped = lightning(
        "wrap", "my_net.pt", "--arch", "my_nets.MyNet", "--num_classes", "10", "--attack", attack,
        "--out", "victim.safetensors", cwd=tmp_path,
    )  # fmt: skip
    assert wrapped.returncode == 0, wrapped.stderr[-2000:]
    assert "my_nets.MyNet, 10 classes" in wrapped.stdout

    marker = tmp_path / "imported.marker"
    marker.unlink()
    model = {"class_path": "FineTune", "init_args": {}}
    # the file names the class; without the config's word nothing is imported
    refused = lightning("fit", "--config", write_config(tmp_path, "ft", model, "ReservedData", 0.5), cwd=tmp_path)
    one_clear_error(refused, "'my_nets.MyNet', which was not imported", "victim_networks: [my_nets.MyNet]")
    assert not marker.exists()
    # positive control: allowed by the config, the class is imported and the run defends the victim
    metrics = defend(tmp_path, "ft_allowed", model, "ReservedData", 0.5, victim_networks=["my_nets.MyNet"])
    assert marker.exists()
    assert all(0.0 <= metrics[f"val/{name}"] <= 1.0 for name in ("ba", "asr", "ra", "victim_asr"))
