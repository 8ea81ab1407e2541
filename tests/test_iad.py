"""IAD, the input-aware dynamic backdoor (issue 8): the generators and their losses, the batch
composition of poisoned and cross samples, and a tiny IAD victim trained through the CLI whose
victim file alone rebuilds the poisoned test set."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_cli import tiny_config
from torch import nn

from lightning_defense.attacks import BadNets, InputAware, attack_from_config
from lightning_defense.attacks.base import to_float, to_uint8
from lightning_defense.attacks.input_aware.torch_model import (
    InputAwareGenerators,
    diversity_loss,
    mask_pretraining_losses,
    partners,
)
from lightning_defense.cli import main
from lightning_defense.data import SyntheticDataModule
from lightning_defense.data.auxiliary import DefenseDataModule, ReservedData
from lightning_defense.errors import ConfigurationError, InputNotFoundError
from lightning_defense.io.safetensors_files import sha256
from lightning_defense.victims import load_victim, read_victim_metadata


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def small_generators(seed: int = 0) -> InputAwareGenerators:
    torch.manual_seed(seed)
    return InputAwareGenerators(width=8)


def calibrated_generators() -> InputAwareGenerators:
    """Untrained generators in eval mode whose BatchNorm statistics are those of random images
    (fresh statistics would leave their outputs nearly constant, unlike trained ones)."""
    generators = small_generators()
    for module in generators.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a cumulative average: one batch sets the statistics
    with torch.no_grad():
        generators.patterns(random_images(32, seed=9))
        generators.masks(random_images(32, seed=9))
    return generators.eval()


def test_mask_pretraining_pushes_the_mask_density_toward_the_target():
    generators = small_generators()
    optimizer = torch.optim.Adam(generators.mask_generator.parameters(), lr=0.01, betas=(0.5, 0.9))
    images = random_images(16)
    norms = []
    for _ in range(20):
        losses = mask_pretraining_losses(generators, images, density=0.032)
        norms.append(losses["norm"].item())
        optimizer.zero_grad()
        (100 * losses["norm"] + losses["diversity"]).backward()  # the official weights
        optimizer.step()
    assert sum(norms[-5:]) / 5 < 0.5 * norms[0]  # the diversity term makes single steps noisy
    # the loss counts only the mask above the density
    assert mask_pretraining_losses(generators, images, density=1.0)["norm"].item() == 0


def test_poisoned_images_change_only_under_the_mask_and_triggers_depend_on_the_image():
    generators = calibrated_generators()
    images = to_float(to_uint8(random_images(8)))
    with torch.no_grad():
        masks, patterns, poisoned = generators.masks(images), generators.patterns(images), generators(images)
    assert masks.shape == (8, 1, 32, 32) and masks.min() >= 0 and masks.max() <= 1
    # x + m (p - x): no pixel moves more than its mask allows, and the result stays an image
    assert ((poisoned - images).abs() <= masks + 1e-6).all()
    assert poisoned.min() >= 0 and poisoned.max() <= 1
    # as saved images: a pixel changes only where the mask reaches half a grey level
    changed = (to_uint8(poisoned) != to_uint8(images)).any(dim=1, keepdim=True)
    assert changed.any() and not changed.all()
    assert (masks[changed] >= 0.5 / 255 - 1e-6).all()
    # input-aware: every image has its own pattern and mask
    assert (patterns - partners(patterns)).flatten(1).abs().amax(dim=1).min() > 1e-3
    assert (masks - partners(masks)).flatten(1).abs().amax(dim=1).min() > 1e-3
    # and the diversity loss punishes one trigger for different images
    same = patterns[:1].expand(4, -1, -1, -1)
    assert diversity_loss(images[:4], images[4:], same, same) > 1e5
    assert diversity_loss(images[:4], images[4:], patterns[:4], patterns[4:]) < 100


@pytest.mark.parametrize("label_mode", ["all_to_one", "all_to_all"])
def test_batch_composition_poisoned_then_cross_then_clean(label_mode):
    generators = calibrated_generators()  # eval mode: each image's trigger depends on that image alone
    generators.mask_generator.requires_grad_(False)  # frozen after its pretraining, as in training
    attack = InputAware(target=3, poison_rate=0.25, cross_rate=0.25, label_mode=label_mode)
    images, labels = random_images(8), torch.arange(8)
    batch = attack.poison_training_batch(generators, images, labels, num_classes=10)
    assert (batch.poisoned, batch.cross) == (2, 2)
    expected = torch.full((2,), 3) if label_mode == "all_to_one" else torch.tensor([1, 2])
    assert torch.equal(batch.labels[:2], expected)  # poisoned: the attacker's labels
    assert torch.equal(batch.labels[2:], labels[2:])  # cross and clean: their true labels
    with torch.no_grad():
        own = generators(images[:2])
        partner = partners(images)[2:4]
        crossed = generators.blend(images[2:4], generators.patterns(partner), generators.masks(partner))
    assert torch.allclose(batch.images[:2], own, atol=1e-6)  # their own trigger
    assert torch.allclose(batch.images[2:4], crossed, atol=1e-6)  # another image's trigger
    assert not torch.allclose(batch.images[2:4], generators(images[2:4]).detach(), atol=1e-3)
    assert torch.equal(batch.images[4:], images[4:])
    # the classifier's loss and the diversity loss reach the trigger generator
    (batch.images.sum() + batch.diversity).backward()
    assert batch.diversity > 0 and all(p.grad is not None for p in generators.trigger_generator.parameters())
    # shares are rounded down per batch, as in the official code
    assert InputAware(poison_rate=0.1, cross_rate=0.1).batch_counts(128) == (12, 12)


def test_settings_that_cannot_work_are_refused():
    with pytest.raises(ConfigurationError, match="poison_rate \\+ cross_rate"):
        InputAware(poison_rate=0.6, cross_rate=0.5)
    with pytest.raises(ConfigurationError, match="SHA-256"):
        InputAware(generators_file="generators.safetensors")
    with pytest.raises(ConfigurationError, match="InputAwareVictimTask"):
        InputAware().poison_training_set(to_uint8(random_images(4)), torch.arange(4), 10)
    with pytest.raises(ConfigurationError, match="generators.safetensors"):
        InputAware().apply(random_images(2))
    with pytest.raises(ConfigurationError, match="multiples of 8"):
        InputAwareGenerators(depth=3).check_image_size((28, 28))


def iad_config(tmp_path: Path, **data_overrides) -> Path:
    path = tiny_config(tmp_path, **({"attack": None} | data_overrides))
    config = yaml.safe_load(path.read_text())
    settings = {"target": 1, "poison_rate": 0.2, "cross_rate": 0.2, "mask_epochs": 1, "generator_width": 8}
    config["model"] = {"class_path": "InputAwareVictimTask", "init_args": {"num_classes": 10, **settings}}
    config["trainer"]["max_epochs"] = 2  # one epoch of each phase
    path.write_text(yaml.safe_dump(config))
    return path


def test_tiny_iad_victim_through_the_cli_and_its_victim_file_rebuilds_the_attack(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning"])
    main(["fit", "--config", str(iad_config(tmp_path)), "--trainer.enable_progress_bar", "false"])
    run = tmp_path / "runs" / "tiny" / "version_0"
    victim_file, generators_file = run / "victim.safetensors", run / "generators.safetensors"
    assert load_victim(victim_file, num_classes=10).frozen
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/ba", "val/asr", "val/cross_acc", "val/mask_density", "train/mask_norm", "train/diversity"} <= set(
        header
    )

    stored = read_victim_metadata(victim_file).attack
    assert stored["class_path"].endswith("InputAware")
    assert stored["init_args"]["target"] == 1 and stored["init_args"]["cross_rate"] == 0.2
    assert Path(stored["init_args"]["generators_file"]) == generators_file.resolve()
    assert stored["init_args"]["generators_sha256"] == sha256(generators_file)

    # the rebuilt attack poisons exactly as the generators at the end of training (the last checkpoint's)
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    prefix = "generators."
    trained = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    written = load_file(str(generators_file))
    assert trained.keys() == written.keys() and all(torch.equal(trained[k], written[k]) for k in trained)
    generators = InputAwareGenerators(width=8)
    generators.load_state_dict(trained)
    attack = attack_from_config(stored)
    images = random_images(6, seed=1)
    with torch.no_grad():
        assert torch.equal(attack.apply(images), generators.eval()(images))

    # a defense rebuilds the poisoned test set from the victim file alone
    source = SyntheticDataModule(train_per_class=8, test_per_class=4, reserved_fraction=0.1)
    defense_data = DefenseDataModule(source, ReservedData(), victim=str(victim_file))
    defense_data.setup()
    poisoned = defense_data.poisoned_test_set
    kept = source.test_set.labels != 1
    assert len(poisoned) == int(kept.sum()) and (poisoned.labels == 1).all()
    clean_images = to_float(source.test_set.images[kept])
    assert torch.equal(poisoned.images, to_uint8(attack.apply(clean_images)))

    # a moved generators file is found again when named; a tampered one is refused before it is read
    moved = tmp_path / "elsewhere.safetensors"
    shutil.move(generators_file, moved)
    with pytest.raises(InputNotFoundError, match="beside the victim file"):
        attack_from_config(stored).apply(images)
    relocated = {**stored, "init_args": {**stored["init_args"], "generators_file": str(moved)}}
    assert torch.equal(attack_from_config(relocated).apply(images), attack.apply(images))
    # copied beside the victim file as <victim stem>.generators.safetensors, it is found unnamed
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(victim_file, shipped / "iad.safetensors")
    shutil.copy(moved, shipped / "iad.generators.safetensors")
    beside = DefenseDataModule(source, ReservedData(), victim=str(shipped / "iad.safetensors"))
    beside.setup()
    assert torch.equal(beside.poisoned_test_set.images, poisoned.images)
    tampered = bytearray(moved.read_bytes())
    tampered[-1] ^= 1
    moved.write_bytes(bytes(tampered))
    with pytest.raises(ConfigurationError, match="SHA-256"):
        attack_from_config(relocated).apply(images)


def test_the_iad_trainer_refuses_a_poisoned_data_module(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning"])
    config = iad_config(tmp_path, attack=BadNets(target=1).config())
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--trainer.enable_progress_bar", "false"])
    assert exit_info.value.code == 2 and "attack: null" in capsys.readouterr().err


def test_a_resumed_iad_run_ends_with_the_generators_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """last.ckpt carries the generators and their optimizers; the phase follows from the epoch."""
    monkeypatch.setattr(sys, "argv", ["lightning"])
    quiet = ["--trainer.enable_progress_bar", "false"]
    written = {}
    for name, stops in (("whole", [3]), ("resumed", [2, 3])):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.chdir(folder)
        config = str(iad_config(folder))
        main(["fit", "--config", config, "--trainer.max_epochs", str(stops[0]), *quiet])
        if len(stops) > 1:  # stopped after the first backdoor epoch, resumed for the second
            last = folder / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
            main(["fit", "--config", config, "--trainer.max_epochs", str(stops[1]), "--ckpt_path", str(last), *quiet])
        (run,) = sorted((folder / "runs" / "tiny").iterdir())[-1:]
        written[name] = load_file(str(run / "generators.safetensors"))
    assert written["whole"].keys() == written["resumed"].keys()
    assert all(torch.equal(written["whole"][k], written["resumed"][k]) for k in written["whole"])
