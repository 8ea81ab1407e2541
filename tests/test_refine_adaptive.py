"""REFINE's adaptive attack (issue 32, part 1): the loss L_b + γ·L_refine, the attacker's own T_a and
M_a, and a victim fine-tuned with it through the CLI."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_cli import tiny_config
from torch import nn

from lightning_defense.attacks import RefineAdaptiveVictimTask, RefineSimulation
from lightning_defense.cli import main
from lightning_defense.defenses.components import LabelPermutation, TransformNet
from lightning_defense.victims import load_victim, read_victim_metadata

SMALL_T = {"transform_encoder_depth": 3, "transform_decoder_channels": [16, 8, 4]}


def small_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)
    )


def simulation(gamma: float) -> RefineSimulation:
    torch.manual_seed(1)
    return RefineSimulation(TransformNet(encoder_depth=3, decoder_channels=(16, 8, 4)), 10, 1, gamma)


def test_the_loss_is_the_backdoor_loss_plus_gamma_times_refine_s_through_t_a_and_m_a():
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])  # the first two as a poisoned batch labels them
    classifier, attack = small_classifier(), simulation(gamma=0.5)
    losses = attack.loss(classifier, images, labels)

    permutation = LabelPermutation(10, 1).permutation
    with torch.no_grad():
        transformed = attack.transform_net(images)
    backdoor = F.cross_entropy(classifier(images), labels)
    refine = F.cross_entropy(classifier(transformed)[:, permutation], labels)
    assert torch.allclose(losses["backdoor"], backdoor) and torch.allclose(losses["refine"], refine)
    assert torch.allclose(losses["loss"], backdoor + 0.5 * refine)
    assert not torch.allclose(refine, F.cross_entropy(classifier(transformed), labels))  # M_a is applied
    assert torch.allclose(simulation(gamma=0).loss(classifier, images, labels)["loss"], backdoor)


def test_gradients_reach_the_classifier_only_and_t_a_stays_as_drawn():
    classifier, attack = small_classifier(), simulation(gamma=1.0)
    drawn = {k: v.clone() for k, v in attack.state_dict().items()}
    attack.train()
    assert not attack.transform_net.training  # its BatchNorm statistics stay those it was drawn with
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    attack.loss(classifier, images, labels)["loss"].backward()
    assert all(p.grad is not None for p in classifier.parameters())
    assert all(p.grad is None and not p.requires_grad for p in attack.parameters())
    assert all(torch.equal(v, attack.state_dict()[k]) for k, v in drawn.items())


def test_the_attacker_s_t_and_m_are_its_own_and_not_the_defender_s():
    defender_m = LabelPermutation(10, 0).permutation  # configs/refine.yaml's permutation_seed
    torch.manual_seed(0)  # the defender's T is drawn from the run's seed (seed_everything: 0)
    defender_t = TransformNet(encoder_depth=3, decoder_channels=(16, 8, 4))
    drawn = []
    for global_seed in (0, 5):  # T_a depends on attacker_seed only, not on the run's seed
        torch.manual_seed(global_seed)
        drawn.append(RefineAdaptiveVictimTask(attacker_seed=1, **SMALL_T).refine_simulation)
    first, second = (s.transform_net.state_dict() for s in drawn)
    assert all(torch.equal(first[k], second[k]) for k in first)
    weights = [k for k in first if k.endswith("weight") and first[k].ndim == 4]
    assert all(not torch.equal(first[k], defender_t.state_dict()[k]) for k in weights)
    for attacker_seed in range(1, 50):
        assert not torch.equal(LabelPermutation(10, attacker_seed).permutation, defender_m)


def test_a_victim_fine_tuned_through_the_cli_records_its_adaptive_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning"])
    main(["fit", "--config", str(tiny_config(tmp_path)), "--trainer.enable_progress_bar", "false"])
    backdoored = tmp_path / "runs" / "tiny" / "version_0" / "victim.safetensors"

    config = yaml.safe_load(tiny_config(tmp_path).read_text())
    config["model"] = {
        "class_path": "RefineAdaptiveVictimTask",
        "init_args": {"arch": "resnet20", "backdoored_victim": str(backdoored), "gamma": 2.0, **SMALL_T},
    }
    start = load_victim(backdoored).state_dict()
    task = RefineAdaptiveVictimTask(**config["model"]["init_args"])  # fine-tuning starts from the file
    assert all(torch.equal(v, task.classifier.state_dict()[k]) for k, v in start.items())

    adaptive_config = tmp_path / "adaptive.yaml"
    adaptive_config.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(adaptive_config), "--trainer.enable_progress_bar", "false"])
    run = tmp_path / "runs" / "tiny" / "version_1"
    tuned = load_victim(run / "victim.safetensors").state_dict()
    assert tuned.keys() == start.keys()  # the classifier alone: T_a and M_a are the attacker's
    assert not all(torch.equal(v, tuned[k]) for k, v in start.items())
    metadata = read_victim_metadata(run / "victim.safetensors")
    assert metadata.extra["refine_adaptive"] == {"gamma": 2.0, "attacker_seed": 1}
    assert metadata.attack["class_path"].endswith("BadNets")  # defenses evaluate the data's trigger
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/backdoor", "train/refine", "val/ba", "val/asr", "val/ra"} <= set(header)

    with pytest.raises(SystemExit) as exit_info:  # another architecture than the file's
        main(["fit", "--config", str(adaptive_config), "--model.init_args.arch", "resnet18"])
    assert exit_info.value.code == 2 and "set arch: resnet20" in capsys.readouterr().err
