"""Label-consistent and Adaptive-Patch attacks (issue 8): triggers on fixed images, the label rules
of clean-label and cover samples, and a tiny victim of each trained through the CLI."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_cli import tiny_config

from lightning_defense.attacks import AdaptivePatch, BadNets, LabelConsistent, attack_from_config
from lightning_defense.attacks.base import to_float, to_uint8
from lightning_defense.cli import main
from lightning_defense.errors import ConfigurationError, InputNotFoundError
from lightning_defense.victims import Classifier, VictimMetadata, load_victim, read_victim_metadata, save_victim

REPO = Path(__file__).resolve().parents[1]
GREY = torch.full((2, 3, 32, 32), 0.5)
# Turner et al.'s 3x3 trigger in the right corners (BackdoorBox's tests/test_LabelConsistent.py)
TURNER = torch.tensor([[0.0, 0, 1], [0, 1, 0], [1, 0, 1]])


def dataset(n: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return to_uint8(images), torch.arange(n) % 10


def clean_victim_file(tmp_path: Path, attack: dict | None = None) -> str:
    """A victim file of an untrained network (PGD needs gradients, not accuracy)."""
    torch.manual_seed(0)
    metadata = VictimMetadata("resnet20", 10, attack=attack)
    return str(save_victim(tmp_path / "clean.safetensors", Classifier("resnet20", 10), metadata))


def changed_images(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return (before != after).flatten(1).any(1).nonzero().flatten()


def test_lc_trigger_is_the_four_corner_checkerboard_and_nothing_else():
    out = LabelConsistent().apply(GREY)
    for corner, expected in (
        (out[..., :3, -3:], TURNER),
        (out[..., -3:, -3:], TURNER),
        (out[..., :3, :3], TURNER.flip(-1)),
        (out[..., -3:, :3], TURNER.flip(-1)),
    ):
        assert torch.equal(corner, expected.expand_as(corner))
    assert torch.equal(out.flip(-1), out)  # a horizontal flip (training augmentation) keeps the trigger
    untouched = torch.ones(32, 32, dtype=torch.bool)
    for rows in (slice(0, 3), slice(-3, None)):
        for cols in (slice(0, 3), slice(-3, None)):
            untouched[rows, cols] = False
    assert torch.equal(out[..., untouched], GREY[..., untouched])
    with pytest.raises(ConfigurationError, match="overlap"):
        LabelConsistent(trigger_size=17).apply(GREY)


def test_lc_perturbs_only_target_images_within_epsilon_keeps_labels_and_adds_the_trigger(tmp_path):
    images, labels = dataset()
    attack = LabelConsistent(target=2, poison_rate=0.5, clean_model=clean_victim_file(tmp_path), steps=5)
    poisoned_images, poisoned_labels, indices = attack.poison_training_set(images, labels, 10)
    assert torch.equal(poisoned_labels, labels)  # clean-label
    assert len(indices) == 5 and (labels[indices] == 2).all()
    assert torch.equal(changed_images(images, poisoned_images), indices)
    adversarial, clean = to_float(poisoned_images[indices]), to_float(images[indices])
    assert torch.equal(adversarial, attack.apply(adversarial))  # the trigger is on top of the perturbation
    inside = torch.ones(32, 32, dtype=torch.bool)
    inside[:3, :3] = inside[:3, -3:] = inside[-3:, :3] = inside[-3:, -3:] = False
    delta = (adversarial - clean)[..., inside]
    assert delta.abs().max() <= 8 / 255 + 0.5 / 255 and delta.abs().max() > 4 / 255
    # PGD moved the images away from their true class on the clean model
    model = load_victim(attack.clean_model)
    target = torch.full((5,), 2)
    triggered = attack.apply(clean)
    assert F.cross_entropy(model(adversarial), target) > F.cross_entropy(model(triggered), target)
    again = LabelConsistent(target=2, poison_rate=0.5, clean_model=attack.clean_model, steps=5)
    assert torch.equal(again.poison_training_set(images, labels, 10)[0], poisoned_images)  # seeded, deterministic


def test_lc_test_set_needs_no_clean_model_and_the_training_set_names_the_clean_config(tmp_path):
    images, labels = dataset()
    attack = LabelConsistent(target=3, clean_model=str(tmp_path / "gone.safetensors"))
    rebuilt = attack_from_config(attack.config())  # as a defense rebuilds it from a victim file
    assert isinstance(rebuilt, LabelConsistent) and rebuilt.config() == attack.config()
    test_images, test_labels = rebuilt.poison_test_set(images, labels, 10)
    assert len(test_labels) == 90 and (test_labels == 3).all()
    assert torch.equal(test_images, to_uint8(rebuilt.apply(to_float(images[labels != 3]))))
    with pytest.raises(InputNotFoundError, match="cifar10_clean.yaml"):
        rebuilt.poison_training_set(images, labels, 10)
    with pytest.raises(ConfigurationError, match=r"`clean_model` is not set.*cifar10_clean\.yaml"):
        LabelConsistent().poison_training_set(images, labels, 10)
    backdoored = clean_victim_file(tmp_path, attack=BadNets().config())
    with pytest.raises(ConfigurationError, match="trained with an attack"):
        LabelConsistent(clean_model=backdoored).poison_training_set(images, labels, 10)
    with pytest.raises(ConfigurationError, match="clean-label"):
        LabelConsistent(label_mode="all_to_all").poison_training_set(images, labels, 10)
    with pytest.raises(ConfigurationError, match="epsilon"):
        LabelConsistent(epsilon=8)


def test_adaptive_patch_test_trigger_stamps_the_seeded_patches_in_the_corners():
    attack = AdaptivePatch()
    out = attack.apply(GREY)
    corners = [(slice(0, 5), slice(0, 5)), (slice(0, 5), slice(-5, None))]
    corners += [(slice(-5, None), slice(0, 5)), (slice(-5, None), slice(-5, None))]
    untouched = torch.ones(32, 32, dtype=torch.bool)
    for pattern, (rows, cols) in zip(attack.patterns, corners, strict=True):
        assert torch.equal(out[..., rows, cols], pattern.expand(2, -1, -1, -1))  # test alpha 1
        untouched[rows, cols] = False
    assert torch.equal(out[..., untouched], GREY[..., untouched])
    assert len({tuple(p.flatten().tolist()) for p in attack.patterns}) == 4  # distinct patterns
    assert all(torch.equal(a, b) for a, b in zip(attack.patterns, AdaptivePatch().patterns, strict=True))
    assert not torch.equal(attack.patterns[0], AdaptivePatch(seed=1).patterns[0])
    # a subset at a partial alpha, at given positions
    partial = AdaptivePatch(positions=[(10, 10), (0, 0), (20, 3), (3, 20)], test_patches=[0, 2], test_alpha=0.5)
    changed = (partial.apply(GREY) != GREY).any(1)[0]
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[10:15, 10:15] = expected[20:25, 3:8] = True
    assert torch.equal(changed, expected)
    blended = partial.apply(GREY)[0, :, 10:15, 10:15]
    assert torch.allclose(blended, 0.5 * 0.5 + 0.5 * partial.patterns[0])


def test_adaptive_patch_training_images_carry_one_weak_trigger_each():
    attack = AdaptivePatch()
    out = attack.apply_training(torch.full((8, 3, 32, 32), 0.5))
    corners = [(slice(0, 5), slice(0, 5)), (slice(0, 5), slice(-5, None))]
    corners += [(slice(-5, None), slice(0, 5)), (slice(-5, None), slice(-5, None))]
    for image, group in zip(out, (0, 0, 1, 1, 2, 2, 3, 3), strict=True):  # equal consecutive groups
        rows, cols = corners[group]
        alpha = attack.train_alphas[group]
        assert torch.allclose(image[:, rows, cols], (1 - alpha) * 0.5 + alpha * attack.patterns[group])
        assert (image != 0.5).any(0).sum() == (image[:, rows, cols] != 0.5).any(0).sum()  # no other patch


@pytest.mark.parametrize("mode", ["all_to_one", "all_to_all"])
def test_adaptive_patch_relabels_poisoned_images_and_keeps_cover_labels(mode):
    images, labels = dataset(200)
    attack = AdaptivePatch(target=3, poison_rate=0.05, cover_rate=0.1, label_mode=mode, seed=4)
    poisoned_images, poisoned_labels, indices = attack.poison_training_set(images, labels, 10)
    assert len(indices) == 10
    expected = torch.full((10,), 3) if mode == "all_to_one" else (labels[indices] + 1) % 10
    assert torch.equal(poisoned_labels[indices], expected)
    changed = changed_images(images, poisoned_images)
    cover = sorted(set(changed.tolist()) - set(indices.tolist()))
    assert len(changed) == 30 and len(cover) == 20 and set(indices.tolist()) <= set(changed.tolist())
    assert torch.equal(poisoned_labels[cover], labels[cover])  # cover samples keep their true labels
    relabelled = (poisoned_labels != labels).nonzero().flatten()
    assert set(relabelled.tolist()) <= set(indices.tolist())
    # training images hold the weak training triggers, not the test trigger
    assert torch.equal(poisoned_images[indices], to_uint8(attack.apply_training(to_float(images[indices]))))
    assert torch.equal(attack.poison_training_set(images, labels, 10)[0], poisoned_images)  # seeded


def test_adaptive_patch_refuses_settings_that_cannot_work():
    with pytest.raises(ConfigurationError, match="one alpha per patch"):
        AdaptivePatch(train_alphas=(0.5, 0.2))
    with pytest.raises(ConfigurationError, match=r"must be in \(0, 1\]"):
        AdaptivePatch(test_alpha=1.5)
    with pytest.raises(ConfigurationError, match="poison_rate \\+ cover_rate"):
        AdaptivePatch(poison_rate=0.6, cover_rate=0.5)
    with pytest.raises(ConfigurationError, match="four corners"):
        AdaptivePatch(patch_sizes=(3,) * 5, train_alphas=(0.5,) * 5)
    with pytest.raises(ConfigurationError, match="test_patches"):
        AdaptivePatch(test_patches=[4])
    with pytest.raises(ConfigurationError, match="does not fit"):
        AdaptivePatch(positions=[(0, 0), (0, 0), (0, 0), (30, 30)]).apply(GREY)
    rebuilt = attack_from_config(AdaptivePatch(positions=[(1, 1), (1, 9), (9, 1), (9, 9)], seed=2).config())
    assert rebuilt.config() == AdaptivePatch(positions=[(1, 1), (1, 9), (9, 1), (9, 9)], seed=2).config()


def test_shipped_configs_build_their_attacks_and_lc_reads_the_shipped_clean_victim():
    def load(name: str) -> dict:
        return yaml.safe_load((REPO / "configs" / "victims" / f"cifar10_{name}.yaml").read_text())

    clean = load("clean")
    assert clean["data"]["init_args"]["attack"] is None
    lc_config = load("lc")
    lc = attack_from_config(lc_config["data"]["init_args"]["attack"])
    assert isinstance(lc, LabelConsistent)
    # a fresh clone has no run folder: the LC config perturbs against the shipped clean victim,
    # which must be clean and trained on the LC victim's own split (the same reserved images held out)
    shipped = read_victim_metadata(REPO / lc.clean_model)
    assert shipped is not None and shipped.attack is None
    split = ("reserved_fraction", "seed")
    lc_data = lc_config["data"]["init_args"]
    assert {k: shipped.data[k] for k in split} == {k: lc_data[k] for k in split}
    assert (lc.epsilon, lc.step_size, lc.steps, lc.poison_rate) == pytest.approx((8 / 255, 1.5 / 255, 100, 0.25))
    adaptive = attack_from_config(load("adaptive_patch")["data"]["init_args"]["attack"])
    assert isinstance(adaptive, AdaptivePatch) and (adaptive.poison_rate, adaptive.cover_rate) == (0.01, 0.02)


def test_clean_lc_and_adaptive_patch_victims_train_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning"])
    quiet = ["--trainer.enable_progress_bar", "false"]

    def fit(name: str, attack: dict | None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        main(["fit", "--config", str(tiny_config(folder, attack=attack)), *quiet])
        run = folder / "runs" / "tiny" / "version_0"
        assert (run / "victim.safetensors").is_file()
        return run

    clean = fit("clean", None)
    assert read_victim_metadata(clean / "victim.safetensors").attack is None
    assert "val/asr" not in (clean / "metrics.csv").read_text().splitlines()[0]
    lc_args = {"target": 1, "poison_rate": 0.5, "clean_model": str(clean / "victim.safetensors"), "steps": 2}
    adaptive_args = {"target": 1, "poison_rate": 0.1, "cover_rate": 0.2, "label_mode": "all_to_all"}
    for name, attack in (("LabelConsistent", lc_args), ("AdaptivePatch", adaptive_args)):
        run = fit(name, {"class_path": name, "init_args": attack})
        assert {"val/ba", "val/asr"} <= set((run / "metrics.csv").read_text().splitlines()[0].split(","))
        stored = read_victim_metadata(run / "victim.safetensors").attack
        assert type(attack_from_config(stored)).__name__ == name


def test_lc_checks_the_clean_model_learnt_the_victims_data(tmp_path):
    victim_data = {"class_path": "x.CIFAR10DataModule", "num_classes": 10, "reserved_fraction": 0.05, "seed": 0,
                   "image_size": [32, 32]}  # fmt: skip

    def clean_model_of(data: dict | None) -> LabelConsistent:
        torch.manual_seed(0)
        path = save_victim(
            tmp_path / "clean.safetensors", Classifier("resnet20", 10), VictimMetadata("resnet20", 10, data=data)
        )
        return LabelConsistent(clean_model=str(path))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same data and split: no error, no warning
        clean_model_of(victim_data).check_training_data(victim_data)
        clean_model_of(None).check_training_data(victim_data)  # nothing recorded: nothing to compare
    with pytest.raises(ConfigurationError, match=r"other data \(\{'class_path': 'x.GTSRBDataModule'\}.*cifar10_clean"):
        clean_model_of(victim_data | {"class_path": "x.GTSRBDataModule"}).check_training_data(victim_data)
    with pytest.raises(ConfigurationError, match="image_size"):
        clean_model_of(victim_data | {"image_size": [64, 64]}).check_training_data(victim_data)
    with pytest.warns(UserWarning, match="another split.*seed 1 vs 0"):
        clean_model_of(victim_data | {"seed": 1}).check_training_data(victim_data)


def test_the_data_module_has_lc_check_its_clean_model_before_pgd(tmp_path):
    from lightning_defense.data import SyntheticDataModule

    torch.manual_seed(0)
    other = VictimMetadata("resnet20", 10, data={"class_path": "x.GTSRBDataModule", "num_classes": 10})
    path = save_victim(tmp_path / "clean.safetensors", Classifier("resnet20", 10), other)
    attack = LabelConsistent(target=1, clean_model=str(path), steps=1)
    data = SyntheticDataModule(train_per_class=4, test_per_class=2, reserved_fraction=0.25, attack=attack)
    with pytest.raises(ConfigurationError, match="trained on other data"):
        data.setup("fit")
