"""Data parallelism: two gloo processes on CPU compute what one process computes on the global batch."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch.distributed.nn.functional import all_gather

from lightning_defense.defenses.components import LabelPermutation, TransformNet
from lightning_defense.defenses.refine.torch_model import RefineModel
from lightning_defense.victims import Classifier

WORLD = 2


def refine_and_batch() -> tuple[RefineModel, torch.Tensor]:
    torch.manual_seed(0)
    victim = Classifier("resnet20", 10)
    transform = TransformNet("resnet18", 3, (32, 16, 8), residual=True)
    refine = RefineModel(victim, transform, LabelPermutation(10), classification_loss="soft", contrastive_weight=1.0)
    # BatchNorm in T normalises with the local batch under DDP (sync_batchnorm needs a GPU), so the
    # comparison keeps its running statistics; everything else is the training computation
    refine.transform_net.eval()
    return refine, torch.rand(16, 3, 32, 32)


def gradients(refine: RefineModel) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in refine.transform_net.parameters() if p.grad is not None])


def ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    refine, images = refine_and_batch()
    local = images.chunk(WORLD)[rank]
    losses = refine.loss(local, gather=lambda t: torch.cat(all_gather(t)))
    losses["loss"].backward()
    grads = gradients(refine)
    dist.all_reduce(grads)  # what DDP does to the gradients: their mean over processes
    grads /= WORLD
    if rank == 0:
        torch.save({"grads": grads, "contrastive": losses["contrastive"].detach()}, out)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refine_loss_under_ddp_equals_one_process_on_the_global_batch(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(ddp_worker, args=(free_port(), out), nprocs=WORLD, join=True)
    ddp = torch.load(out, weights_only=True)
    refine, images = refine_and_batch()
    losses = refine.loss(images)
    losses["loss"].backward()
    assert torch.allclose(ddp["contrastive"], losses["contrastive"].detach(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(ddp["grads"], gradients(refine), rtol=1e-4, atol=1e-6)
    # and without the gather, each process would contrast only its half: a different loss
    refine, images = refine_and_batch()
    halves = [refine.loss(half)["contrastive"].detach() for half in images.chunk(WORLD)]
    assert not torch.allclose(torch.stack(halves).mean(), losses["contrastive"].detach(), rtol=1e-3)


def fit_under_ddp(config: dict, tmp_path) -> str:
    """``lightning fit`` on ``config`` in a subprocess (in-process DDP would relaunch pytest); its output."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lightning_defense", "fit", "--config", str(tmp_path / "config.yaml")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_refine_trains_under_ddp_through_the_cli_and_exports_once(tmp_path):

    from lightning_defense.attacks import BadNets
    from lightning_defense.victims import VictimMetadata, save_victim

    victim = tmp_path / "victim.safetensors"
    save_victim(victim, Classifier("resnet20", 10), VictimMetadata("resnet20", 10, attack=BadNets().config()))
    source = {"train_per_class": 8, "test_per_class": 4, "reserved_fraction": 0.25}
    config = {
        "seed_everything": 0,
        "model": {"class_path": "REFINE", "init_args": {"victim": str(victim), "encoder_depth": 3,
                                                         "decoder_channels": [16, 8, 4], "contrastive_weight": 1.0}},
        "data": {"class_path": "DefenseDataModule", "init_args": {
            "source": {"class_path": "SyntheticDataModule", "init_args": source},
            "aux_data": {"class_path": "ReservedData"}, "victim": str(victim), "batch_size": 4}},
        "trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "enable_progress_bar": False,
                    "strategy": "ddp", "devices": 2, "accelerator": "cpu", "enable_model_summary": False,
                    "log_every_n_steps": 1,
                    "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs")}}},
    }  # fmt: skip
    output = fit_under_ddp(config, tmp_path)
    assert output.count("Defended model written to") == 1
    run = next((tmp_path / "runs").glob("*/version_0"))
    assert (run / "defended.safetensors").is_file()
    assert "train/contrastive" in (run / "metrics.csv").read_text().splitlines()[0]


DEFENSES = {
    "btidbf_p": ("BTIDBFPurification", "defended.safetensors"),
    "btidbf_u": ("BTIDBFUnlearning", "repaired_victim.safetensors"),
    "ft": ("FineTune", "repaired_victim.safetensors"),
    "fst": ("FeatureShiftTune", "repaired_victim.safetensors"),
    "neural_cleanse": ("NeuralCleanse", "repaired_victim.safetensors"),
}


@pytest.mark.parametrize("name", DEFENSES)
def test_each_labeled_defense_trains_under_ddp_and_writes_its_export_once(name, tmp_path):

    from lightning_defense.attacks import BadNets
    from lightning_defense.victims import VictimMetadata, save_victim

    class_name, export = DEFENSES[name]
    victim = tmp_path / "victim.safetensors"
    save_victim(victim, Classifier("resnet20", 10), VictimMetadata("resnet20", 10, attack=BadNets().config()))
    model = {"victim": str(victim)}
    if class_name.startswith("BTIDBF"):  # manual optimization, one optimizer per part
        model |= {"rounds": 1, "mask_epochs": 1, "generator_epochs": 1, "defense_epochs": 1}
        model |= {"encoder_depth": 3, "decoder_channels": [16, 8, 4]}
    if class_name == "NeuralCleanse":  # each step's window closes: λ moves by the counts of both processes
        model |= {"inversion_epochs": 1, "cost_patience": 1, "image_size": [32, 32]}
    source = {"train_per_class": 8, "test_per_class": 4, "reserved_fraction": 0.5}
    config = {
        "seed_everything": 0,
        "model": {"class_path": class_name, "init_args": model},
        "data": {"class_path": "DefenseDataModule", "init_args": {
            "source": {"class_path": "SyntheticDataModule", "init_args": source},
            "aux_data": {"class_path": "ReservedData"}, "victim": str(victim), "batch_size": 4}},
        "trainer": {"max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "strategy": "ddp_find_unused_parameters_true", "devices": 2, "accelerator": "cpu",
                    "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs")}}},
    }  # fmt: skip
    assert fit_under_ddp(config, tmp_path).count(" written to ") == 1  # rank 0 alone writes the export
    run = next((tmp_path / "runs").glob("*/version_0"))
    assert (run / export).is_file() and "val/ba" in (run / "metrics.csv").read_text()


def test_ba_and_asr_under_ddp_equal_one_process(tmp_path):
    """torchmetrics syncs the counts over processes: the shipped victim on the embedded test set
    (2,000 clean, 1,800 poisoned images, both even, so the distributed sampler pads nothing)."""
    repo = Path(__file__).resolve().parents[1]
    results = {}
    for devices in (1, 2):
        save = tmp_path / f"devices{devices}"
        command = [
            sys.executable, "-m", "lightning_defense", "validate", "--config", str(repo / "configs" / "finetune.yaml"),
            "--trainer.devices", str(devices), "--trainer.accelerator", "cpu", "--trainer.precision", "32",
            "--trainer.logger.init_args.save_dir", str(save),
            *(["--trainer.strategy", "ddp"] if devices > 1 else []),
        ]  # fmt: skip
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        row = next(csv.DictReader(next(save.glob("*/version_0/metrics.csv")).open()))
        results[devices] = {k: float(v) for k, v in row.items() if k.startswith("val/") and v}
    assert (
        results[1].keys() == results[2].keys()
        and {"val/ba", "val/asr", "val/asr_any", "val/victim_asr_any"} <= results[1].keys()
    )
    assert results[1] == results[2]
    assert results[1]["val/victim_asr"] > 0.9 and 0.7 < results[1]["val/victim_ba"] < 0.95  # real numbers
