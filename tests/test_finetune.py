"""The fine-tuning baselines: FT and FST repair a copy and leave the victim as it was."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from lightning_defense.defenses.finetune import FeatureShiftTuning, FineTuning
from lightning_defense.victims import Classifier, load_victim

REPO = Path(__file__).resolve().parents[1]


def victim() -> Classifier:
    torch.manual_seed(0)
    return Classifier("resnet20", 10).freeze()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def step(model: FineTuning, images: torch.Tensor, labels: torch.Tensor) -> None:
    optimizer = torch.optim.SGD(model.repaired.parameters(), lr=0.1, momentum=0.9)
    model.repaired.train()
    model.loss(images, labels)["loss"].backward()
    optimizer.step()
    model.after_step()


def test_fine_tuning_changes_the_copy_and_never_the_victim():
    model = FineTuning(victim())
    before_victim, before_copy = snapshot(model.victim), snapshot(model.repaired)
    images, labels = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    step(model, images, labels)
    after_victim, after_copy = snapshot(model.victim), snapshot(model.repaired)
    assert all(torch.equal(before_victim[k], after_victim[k]) for k in before_victim)  # BN buffers too
    assert not torch.equal(before_copy["network.fc.weight"], after_copy["network.fc.weight"])
    assert not model.victim.training and not any(p.requires_grad for p in model.victim.parameters())


def test_fst_starts_from_a_new_head_of_the_original_norm_and_moves_away_from_the_old_one():
    original = victim()
    old_head = original.linear_layer.weight.clone()
    model = FeatureShiftTuning(original, shift_weight=5.0)
    head = model.repaired.linear_layer.weight
    assert not torch.allclose(head, old_head)
    assert torch.isclose(head.norm(), old_head.norm())
    torch.manual_seed(1)
    images, labels = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    overlaps = []
    for _ in range(5):
        overlaps.append(float(model.loss(images, labels)["head_overlap"].detach()))
        step(model, images, labels)
    assert overlaps[-1] < overlaps[0]  # the penalty pushes the head away from the backdoored one
    assert torch.isclose(model.repaired.linear_layer.weight.norm(), old_head.norm())  # projected back


def test_ft_and_fst_configs_run_end_to_end_in_short(tmp_path):
    for layers, name in (([], "finetune"), (["--config", str(REPO / "configs" / "finetune" / "fst.yaml")], "fst")):
        command = [
            sys.executable, "-m", "lightning_defense", "fit",
            "--config", str(REPO / "configs" / "finetune.yaml"), *layers,
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        ]  # fmt: skip
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "->  defended BA" in done.stdout + done.stderr
        run = tmp_path / "runs" / name / "version_0"
        repaired = load_victim(run / "repaired_victim.safetensors")
        shipped = load_victim(REPO / "checkpoints" / "cifar10_resnet20_badnets.safetensors")
        assert not torch.equal(repaired.linear_layer.weight, shipped.linear_layer.weight)
        header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"val/ba", "val/asr", "val/victim_ba"} <= set(header)


def test_ft_then_refine_on_the_repaired_copy_through_the_configs(tmp_path):
    shipped = str(REPO / "checkpoints" / "cifar10_resnet20_badnets.safetensors")
    short = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
             "--trainer.check_val_every_n_epoch", "1"]  # fmt: skip
    steps = (  # the two commands of configs/refine/after_finetune.yaml, run where runs/ is written
        ["--config", str(REPO / "configs" / "finetune.yaml"), "--trainer.logger.init_args.name", "ft_for_refine",
         "--model.init_args.victim", shipped, "--data.init_args.victim", shipped],
        ["--config", str(REPO / "configs" / "refine.yaml"),
         "--config", str(REPO / "configs" / "refine" / "after_finetune.yaml")],
    )  # fmt: skip
    for arguments in steps:
        command = [sys.executable, "-m", "lightning_defense", "fit", *arguments, *short]
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    from lightning_defense.defenses.refine import load_defended

    repaired = tmp_path / "runs" / "ft_for_refine" / "version_0" / "repaired_victim.safetensors"
    defended = load_defended(tmp_path / "runs" / "ft_refine" / "version_0" / "defended.safetensors", repaired)
    assert torch.equal(defended.victim.linear_layer.weight, load_victim(repaired).linear_layer.weight)
    header = (tmp_path / "runs" / "ft_refine" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "val/asr" in header  # the copy kept the original's attack, so ASR is measured
