from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning import Callback, Trainer

from lightning_defense.attacks import BadNets
from lightning_defense.data import DefenseDataModule, SeenData, SyntheticDataModule
from lightning_defense.defenses.btidbf import (
    BTIDBFPurification,
    BTIDBFUnlearning,
    FeatureMask,
    RoundSchedule,
    decoupling_loss,
    generator_loss,
)
from lightning_defense.defenses.btidbf.torch_model import input_distance
from lightning_defense.training.callbacks import TransformGrid
from lightning_defense.victims import Classifier, VictimMetadata, load_victim, save_victim

TINY_UNET = {"encoder_depth": 3, "decoder_channels": (16, 8, 4)}


def toy_victim(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier("resnet20", 10).freeze()


def victim_file(tmp_path: Path) -> str:
    path = tmp_path / "victim.safetensors"
    save_victim(path, toy_victim(), VictimMetadata("resnet20", 10, attack=BadNets(target=3).config()))
    return str(path)


def data(victim: str) -> DefenseDataModule:
    source = SyntheticDataModule(train_per_class=4, test_per_class=2, reserved_fraction=0.0)
    return DefenseDataModule(source, SeenData(), victim=victim, batch_size=8)


def test_schedule_maps_every_epoch_to_its_round_and_phase():
    schedule = RoundSchedule(rounds=2, mask_epochs=2, generator_epochs=3, defense_epochs=4)
    assert schedule.round_epochs == 10 and schedule.total_epochs == 20
    names = [schedule.at(e).name for e in range(10)]
    assert names == ["mask"] * 2 + ["generator"] * 3 + ["detect"] + ["defense"] * 4
    phase = schedule.at(13)
    assert (phase.round, phase.name, phase.epoch, phase.epochs) == (1, "generator", 1, 3)
    assert schedule.at(19).last_epoch and schedule.at(10).first_epoch
    with pytest.raises(ValueError, match="Epoch 20 is past"):
        schedule.at(20)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        RoundSchedule(0, 1, 1, 1)
    assert [e for e in range(20) if schedule.ends_block(e)] == [9, 19]  # validation after each round


def test_pretraining_comes_first_and_shifts_every_round():
    schedule = RoundSchedule(rounds=2, mask_epochs=2, generator_epochs=3, defense_epochs=4, pretrain_epochs=3)
    assert schedule.total_epochs == 23
    assert [(schedule.at(e).round, schedule.at(e).name) for e in (0, 2, 3)] == [
        (-1, "pretrain"),
        (-1, "pretrain"),
        (0, "mask"),
    ]
    assert schedule.at(2).last_epoch and (schedule.at(16).round, schedule.at(16).name) == (1, "generator")
    assert [e for e in range(23) if schedule.ends_block(e)] == [2, 12, 22]
    with pytest.raises(ValueError, match="pretrain_epochs must be >= 0"):
        RoundSchedule(1, 1, 1, 1, pretrain_epochs=-1)


def test_each_phase_trains_one_part_with_its_own_optimizer_and_a_resume_must_match_the_schedule():
    schedule = RoundSchedule(rounds=2, mask_epochs=2, generator_epochs=3, defense_epochs=4, pretrain_epochs=3)
    expected = {"mask": (0, "mask"), "generator": (1, "generator"), "defense": (2, "defense")}
    for phase, (index, part) in expected.items():
        trains = schedule.trained_parts(phase, pretrain_generator=True)
        assert [name for name, on in trains.items() if on] == [part]
        assert schedule.optimizer_index(phase, pretrain_generator=True) == index
    # the pretraining trains the generator's UNet, or the defense's when only that one is pretrained
    assert schedule.optimizer_index("pretrain", pretrain_generator=True) == 1
    assert schedule.optimizer_index("pretrain", pretrain_generator=False) == 2
    assert not any(schedule.trained_parts("detect", pretrain_generator=True).values())
    with pytest.raises(ValueError, match="trains nothing"):
        schedule.optimizer_index("detect", pretrain_generator=True)
    schedule.check_resumed((1, "generator", 1), 16)  # where this schedule puts epoch 16
    with pytest.raises(ValueError, match="round 2, phase 'generator'.*round 2, phase 'mask'"):
        RoundSchedule(2, 4, 3, 4, pretrain_epochs=3).check_resumed((1, "generator", 1), 16)


def test_pretraining_weighs_the_input_distance_100_beyond_the_bound_and_001_within():
    from lightning_defense.defenses.btidbf.torch_model import pretrain_loss

    victim = toy_victim()
    images = torch.rand(8, 3, 32, 32)
    for shift, weight in ((0.5, 100.0), (0.01, 0.01)):
        parts = pretrain_loss(victim, Shift(shift), images, input_bound=0.1)
        assert (parts["input_distance"] > 0.1) == (weight == 100.0)
        expected = parts["prediction_ce"] + parts["feature_distance"] + weight * parts["input_distance"]
        torch.testing.assert_close(parts["loss"], expected)
    same = pretrain_loss(victim, Shift(0.0), images, input_bound=0.1)
    probabilities = victim(images).softmax(dim=1)  # the identity keeps the prediction: CE is its entropy
    torch.testing.assert_close(same["prediction_ce"], -(probabilities * probabilities.log()).sum(1).mean())
    assert same["feature_distance"] == 0 and same["input_distance"] == 0


def test_mask_stays_in_the_open_unit_interval_and_its_loss_decreases():
    victim = toy_victim()
    images = torch.rand(32, 3, 32, 32)
    labels = victim(images).argmax(dim=1)  # labels the victim can explain
    mask = FeatureMask(tuple(victim.features(images[:1]).shape[1:]))
    optimizer = torch.optim.Adam(mask.parameters(), lr=0.01)
    losses = []
    for _ in range(15):
        loss = decoupling_loss(victim, mask, images, labels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01
    assert victim.features(images[:1]).shape[1:] == mask().shape  # one weight per feature element
    with torch.no_grad():
        mask.weight.copy_(torch.linspace(-50, 50, mask.weight.numel()).view_as(mask.weight))
    values = mask()  # tanh saturates to +-1 in float32 here, and m still stays inside
    assert values.min() > 0 and values.max() < 1


class Shift(torch.nn.Module):
    """A generator that adds a learnable constant to every pixel."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = torch.nn.Parameter(torch.tensor(shift))

    def forward(self, images):
        return images + self.shift


def test_generator_far_from_the_input_is_pulled_back_by_the_input_distance_alone():
    victim = toy_victim()
    images = torch.rand(8, 3, 32, 32)
    mask = torch.full(victim.features(images[:1]).shape[1:], 0.5)
    far = generator_loss(victim, mask, Shift(0.5), images, input_bound=0.3, feature_bound=1e9, benign_weight=0.01)
    assert far["outside_bounds"] == 1
    assert far["input_distance"] > 0.3 and far["loss"] == far["input_distance"]
    shift = Shift(0.5)
    far = generator_loss(victim, mask, shift, images, input_bound=0.3, feature_bound=1e9, benign_weight=0.01)
    far["loss"].backward()
    alone = Shift(0.5)
    input_distance(victim, images, alone(images)).backward()
    torch.testing.assert_close(shift.shift.grad, alone.shift.grad)  # no feature term pulls G
    near = generator_loss(victim, mask, Shift(0.01), images, input_bound=0.3, feature_bound=1e9, benign_weight=0.01)
    assert near["outside_bounds"] == 0
    expected = -near["backdoor_distance"] + 0.01 * near["benign_distance"]
    torch.testing.assert_close(near["loss"], expected)
    # the benign-feature bound switches too
    tight = generator_loss(victim, mask, Shift(0.01), images, input_bound=0.3, feature_bound=0.0, benign_weight=0.01)
    assert tight["loss"] == tight["input_distance"]
    # from the second round the target's cross-entropy is added
    pushed = generator_loss(victim, mask, Shift(0.01), images, 0.3, 1e9, 0.01, target=4)
    torch.testing.assert_close(pushed["loss"], expected + pushed["target_ce"])


def tiny_trainer(tmp_path: Path, **kwargs) -> Trainer:
    defaults = {
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        "enable_checkpointing": False,
    }
    return Trainer(**{**defaults, **kwargs})


def test_purification_leaves_the_victim_untouched_and_exports_a_loadable_defense(tmp_path):
    from lightning_defense.defenses.components import load_defended

    victim = victim_file(tmp_path)
    module = BTIDBFPurification(victim, rounds=1, mask_epochs=1, generator_epochs=1, defense_epochs=1, **TINY_UNET)
    purifier_before = [p.clone() for p in module.model.purifier.parameters()]
    trainer = tiny_trainer(tmp_path, enable_checkpointing=True, callbacks=[TransformGrid(num_images=4)])
    trainer.fit(module, data(victim))
    assert trainer.current_epoch == 4  # the schedule set max_epochs: 1 + 1 + 1 (vote) + 1
    # checkpoints every 4 epochs (the largest divisor of 4 up to the default 5): the final state is saved
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["epoch"] == 3 and final["btidbf"]["phase"] == "defense"
    original = load_victim(victim).state_dict()
    assert all(torch.equal(module.victim.state_dict()[k], v) for k, v in original.items())  # weights and BN buffers
    assert any(not torch.equal(a, b) for a, b in zip(purifier_before, module.model.purifier.parameters()))
    assert 0 <= int(module.model.detected_target) < 10
    metrics = trainer.callback_metrics
    logged = {"val/ba", "val/victim_asr", "val/dsr", "val/detection_f1", "val/generated_feature_distance"}
    assert logged | {"val/generated_trigger_cosine"} <= set(metrics)
    assert -1 <= float(metrics["val/generated_trigger_cosine"]) <= 1
    assert float(metrics["val/dsr"]) == float(int(module.model.detected_target) == 3)
    assert (tmp_path / "transforms" / "epoch_003.png").stat().st_size > 1000  # G(x) and Ĝ(x) drawn
    deployed = load_defended(tmp_path / "defended.safetensors")
    images = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(deployed(images), module.eval()(images), atol=1e-5, rtol=1e-4)


class AtValidation(Callback):
    """Records, at each validation after training started, the epoch and whether the purifier
    equals G and G's optimizer has no state."""

    def __init__(self) -> None:
        self.seen = []

    def on_validation_epoch_start(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        model = pl_module.model
        same = all(
            torch.equal(a, b)
            for a, b in zip(model.purifier.state_dict().values(), model.generator.state_dict().values())
        )
        self.seen.append((trainer.current_epoch, same, len(pl_module.optimizers()[1].optimizer.state)))


def test_pretraining_starts_the_purifier_and_g_from_one_plain_unet_and_validates_after_it(tmp_path):
    victim = victim_file(tmp_path)
    settings = {"rounds": 1, "mask_epochs": 1, "generator_epochs": 1, "defense_epochs": 1, **TINY_UNET}
    module = BTIDBFPurification(victim, pretrain_epochs=2, **settings)
    assert not module.model.generator.residual and not module.model.purifier.residual
    purifier_before = [p.clone() for p in module.model.purifier.parameters()]
    record = AtValidation()
    trainer = tiny_trainer(tmp_path, callbacks=[record])
    trainer.fit(module, data(victim))
    assert trainer.current_epoch == 6  # 2 pretraining epochs + 1 + 1 + 1 (vote) + 1
    # after the pretraining (epoch 1): the purifier is the pretrained G, whose Adam starts afresh;
    # after the round (epoch 5): both have trained on from there
    assert record.seen == [(1, True, 0), (5, False, record.seen[1][2])] and record.seen[1][2] > 0
    assert any(not torch.equal(a, b) for a, b in zip(purifier_before, module.model.purifier.parameters()))
    assert set(module.phase_seconds) == {"pretrain", "mask", "generator", "detect", "defense"}
    assert "val/ba" in trainer.callback_metrics


def test_pretraining_the_purifier_alone_leaves_g_residual_and_untouched(tmp_path):
    victim = victim_file(tmp_path)
    settings = {"rounds": 1, "mask_epochs": 1, "generator_epochs": 1, "defense_epochs": 1, **TINY_UNET}
    module = BTIDBFPurification(victim, pretrain_epochs=1, pretrain_generator=False, **settings)
    assert module.model.generator.residual and not module.model.purifier.residual
    generator_before = [p.clone() for p in module.model.generator.parameters()]
    purifier_before = [p.clone() for p in module.model.purifier.parameters()]
    seen = []

    class AfterPretraining(Callback):
        def on_validation_epoch_start(self, trainer, pl_module):
            if trainer.sanity_checking or trainer.current_epoch != 0:
                return
            model = pl_module.model
            untouched = all(torch.equal(a, b) for a, b in zip(generator_before, model.generator.parameters()))
            trained = any(not torch.equal(a, b) for a, b in zip(purifier_before, model.purifier.parameters()))
            seen.append((untouched, trained, len(pl_module.optimizers()[2].optimizer.state)))

    tiny_trainer(tmp_path, callbacks=[AfterPretraining()]).fit(module, data(victim))
    assert seen == [(True, True, 0)]  # the purifier's Adam starts afresh for step 3
    with pytest.raises(ValueError, match="no UNet but G to pretrain"):
        BTIDBFUnlearning(victim, pretrain_epochs=1, pretrain_generator=False, **settings)


def test_unlearning_changes_only_the_copy_and_writes_a_repaired_victim_file(tmp_path):
    victim = victim_file(tmp_path)
    module = BTIDBFUnlearning(victim, rounds=1, mask_epochs=1, generator_epochs=1, defense_epochs=1, **TINY_UNET)
    trainer = tiny_trainer(tmp_path)
    trainer.fit(module, data(victim))
    original = load_victim(victim).state_dict()
    assert all(torch.equal(module.victim.state_dict()[k], v) for k, v in original.items())
    repaired = module.model.repaired.state_dict()
    assert any(not torch.equal(repaired[k], v) for k, v in original.items())
    exported = load_victim(tmp_path / "repaired_victim.safetensors")
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in repaired.items())
    assert not module.victim.training  # the victim never left eval mode


def test_a_single_optimizer_from_the_config_is_refused_with_the_fix(tmp_path):
    victim = victim_file(tmp_path)
    module = BTIDBFUnlearning(victim, rounds=1, mask_epochs=1, generator_epochs=1, defense_epochs=1, **TINY_UNET)
    # what LightningCLI does with an `optimizer:` section
    module.configure_optimizers = lambda: torch.optim.Adam(module.parameters())
    with pytest.raises(ValueError, match="remove the `optimizer:`/`lr_scheduler:` section"):
        tiny_trainer(tmp_path).fit(module, data(victim))


class StopAfter(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class RecordStart(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if not hasattr(self, "phase"):
            self.phase = pl_module.phase
            self.detected_target = int(pl_module.model.detected_target)
            self.steps = [
                max((s.get("step", torch.tensor(0)).item() for s in o.optimizer.state.values()), default=0)
                for o in pl_module.optimizers()
            ]


def test_a_run_resumes_mid_phase_and_mid_round_with_its_optimizer_states(tmp_path):
    victim = victim_file(tmp_path)
    settings = {"rounds": 2, "mask_epochs": 1, "generator_epochs": 3, "defense_epochs": 1, **TINY_UNET}
    first = BTIDBFUnlearning(victim, checkpoint_every_n_epochs=1, **settings)
    # stop inside round 2's generator phase: epochs 0-5 are round 1, 6 is round 2's mask, 7-9 its generator;
    # validation runs once a round (epochs 5 and 11), and last.ckpt is written every epoch regardless
    trainer = tiny_trainer(tmp_path, enable_checkpointing=True, callbacks=[StopAfter(7)])
    trainer.fit(first, data(victim))
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["btidbf"]["round"] == 1 and saved["btidbf"]["phase"] == "generator"
    assert saved["btidbf"]["epoch_in_phase"] == 0
    generator_steps = max(s["step"].item() for s in saved["optimizer_states"][1]["state"].values())
    assert generator_steps == 2 * 4  # 4 generator epochs of 2 steps so far

    resumed = BTIDBFUnlearning(victim, **settings)
    record = RecordStart()
    trainer = tiny_trainer(tmp_path, callbacks=[record])
    trainer.fit(resumed, data(victim), ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert (record.phase.round, record.phase.name, record.phase.epoch) == (1, "generator", 1)
    assert record.steps[1] == generator_steps  # the generator's Adam continues, not restarts
    assert record.steps[2] == 2  # and so does the unlearning optimizer (round 1's epoch)
    assert record.detected_target == int(first.model.detected_target)  # round 1's vote, restored
    assert set(resumed.phase_seconds) == {"mask", "generator", "detect", "defense"}
    assert trainer.current_epoch == 12
    # the votes are no buffer: DDP broadcasts buffers from rank 0 before every step and would
    # overwrite the other ranks' counts; they travel in the checkpoint's own entry instead
    assert not any("target_votes" in name for name, _ in resumed.named_buffers())
    assert saved["btidbf"]["target_votes"] == first.target_votes.tolist() and sum(saved["btidbf"]["target_votes"]) > 0

    other = BTIDBFUnlearning(victim, **{**settings, "generator_epochs": 2})
    with pytest.raises(ValueError, match="resume with the rounds and epochs per phase"):
        tiny_trainer(tmp_path).fit(other, data(victim), ckpt_path=tmp_path / "checkpoints" / "last.ckpt")


def test_the_official_purifier_loss_trains_on_the_benign_batch_alone_with_noise_and_a_hard_bound():
    from lightning_defense.defenses.btidbf.torch_model import Purification

    victim = toy_victim()
    images, labels = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    paper = Purification(victim, Shift(0.0), Shift(0.0)).defense_loss(images, labels)
    assert {"poisoned_ce", "benign_ce"} <= set(paper)  # the paper's two terms
    assert paper["benign_input_distance"] == 0  # identity G and purifier, no noise
    for shift, weight in ((0.5, 100.0), (0.01, 1.0)):
        official = Purification(victim, Shift(0.0), Shift(shift), generated_batch=False, input_bound_purifier=0.05)
        parts = official.defense_loss(images, labels)
        assert not any(key.startswith("poisoned") for key in parts)
        expected = parts["benign_ce"] + parts["benign_feature_distance"] + weight * parts["benign_input_distance"]
        torch.testing.assert_close(parts["loss"], expected)
    noisy = Purification(victim, Shift(0.0), Shift(0.0), generated_batch=False, purifier_noise=0.03)
    distance = noisy.defense_loss(images, labels)["benign_input_distance"]
    assert 5e-4 < distance < 1.2e-3  # 0.03 of the normalized scale, squared, a little less where clamped


def test_round_one_works_on_the_victim_and_later_rounds_on_the_defended_model():
    from lightning_defense.defenses.btidbf.torch_model import Purification

    victim = toy_victim()
    model = Purification(victim, Shift(0.0), Shift(0.3))  # a purifier far from the identity (pretrained)
    images = torch.rand(8, 3, 32, 32)
    labels = victim(images).argmax(dim=1)
    first = model.mask_loss(images, labels, round_index=0)["loss"]
    later = model.mask_loss(images, labels, round_index=1)["loss"]
    torch.testing.assert_close(first, decoupling_loss(victim, model.feature_mask, images, labels)["loss"])
    torch.testing.assert_close(later, decoupling_loss(model.defended(), model.feature_mask, images, labels)["loss"])
    assert not torch.isclose(first, later)
    torch.testing.assert_close(model.attacked(1)(images), victim(images + 0.3))
    assert model.attacked(0) is model.victim


def test_replay_draws_each_image_from_the_earlier_generators_or_the_current_one():
    from lightning_defense.defenses.btidbf.torch_model import Purification

    victim = toy_victim()
    model = Purification(victim, Shift(0.0), Shift(0.0), replay_generators=True)
    model.remember_generator()  # round 1's G: + 0
    with torch.no_grad():
        model.generator.shift.fill_(0.5)  # round 2's G: + 0.5
    (earlier,) = model.earlier_generators
    assert not earlier.shift.requires_grad and float(earlier.shift) == 0.0
    images = torch.rand(64, 3, 32, 32)
    shifts = (model.generate(images) - images).flatten(1).mean(dim=1)
    assert torch.all(torch.isclose(shifts, torch.tensor(0.0), atol=1e-6) | torch.isclose(shifts, torch.tensor(0.5)))
    assert 10 < int((shifts > 0.25).sum()) < 54  # both generators, about half each
    model.replay_generators = False  # the paper: this round's G alone
    torch.testing.assert_close(model.generate(images), images + 0.5)


def test_replayed_generators_are_kept_once_a_round_and_restored_on_resume(tmp_path):
    victim = victim_file(tmp_path)
    settings = {"rounds": 3, "mask_epochs": 1, "generator_epochs": 1, "defense_epochs": 1, **TINY_UNET}
    first = BTIDBFPurification(victim, replay_generators=True, checkpoint_every_n_epochs=1, **settings)
    # rounds are 4 epochs (mask, generator, vote, purifier): stop after round 3's mask (epoch 8)
    tiny_trainer(tmp_path, enable_checkpointing=True, callbacks=[StopAfter(8)]).fit(first, data(victim))
    round_1, round_2 = first.model.earlier_generators
    # round 2's copy is G as it is now (G was last trained in round 2); round 1's is older
    current = first.model.generator.state_dict().values()
    assert all(torch.equal(a, b) for a, b in zip(round_2.state_dict().values(), current))
    assert any(not torch.equal(a, b) for a, b in zip(round_1.parameters(), round_2.parameters()))
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert {k.split(".")[2] for k in saved if k.startswith("model.earlier_generators.")} == {"0", "1"}

    resumed = BTIDBFPurification(victim, replay_generators=True, **settings)
    trainer = tiny_trainer(tmp_path)
    trainer.fit(resumed, data(victim), ckpt_path=tmp_path / "checkpoints" / "last.ckpt")
    assert trainer.current_epoch == 12 and len(resumed.model.earlier_generators) == 2  # none after the last round
    for name, value in resumed.model.earlier_generators.state_dict().items():
        torch.testing.assert_close(value, saved[f"model.earlier_generators.{name}"])  # restored, then frozen


@pytest.mark.parametrize("config", ["btidbf_p.yaml", "btidbf_u.yaml"])
def test_the_shipped_configs_run_end_to_end_in_short(tmp_path, config):
    """The embedded defaults as users run them (shipped victim, embedded data), cut to a few steps."""
    repo = Path(__file__).resolve().parents[1]
    short = ["--model.init_args.rounds", "2", "--model.init_args.mask_epochs", "1"]
    short += ["--model.init_args.generator_epochs", "1", "--model.init_args.defense_epochs", "1"]
    short += ["--model.init_args.decoder_channels", "[16, 8, 4, 4]"]
    command = [
        sys.executable, "-m", "lightning_defense", "fit", "--config", str(repo / "configs" / config), *short,
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert len(re.findall(r"BTI-DBF round 1: detected target class \d", output)) == 1
    assert re.search(r"BTI-DBF round 2: G\(x\) lands on the detected class \d for [\d.]+% of images", output)
    assert re.search(
        r"victim BA \d+\.\d\d% / ASR \d+\.\d\d% / RA \d+\.\d\d% / ASR-any \d+\.\d\d%  ->  "
        r"defended BA \d+\.\d\d% / ASR \d+\.\d\d% / RA \d+\.\d\d% / ASR-any \d+\.\d\d%",
        output,
    )
    assert "BTI-DBF wall time per phase: mask" in output
    run = next((tmp_path / "runs").glob("*/version_0"))
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/ba", "val/asr", "val/dsr", "val/detection_f1", "train/generator_loss", "train/phase"} <= set(header)
    epochs = {int(r["epoch"]) for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val/ba")}
    assert epochs == {3, 7}  # at the end of each round of 1 + 1 + 1 + 1 epochs
    exported = "defended.safetensors" if config == "btidbf_p.yaml" else "repaired_victim.safetensors"
    assert (run / exported).is_file()
    phase_seconds = json.loads((run / "phase_seconds.json").read_text())
    assert set(phase_seconds) == {"mask", "generator", "detect", "defense"} and min(phase_seconds.values()) > 0


def test_inversion_metrics_on_a_hand_made_batch():
    from lightning_defense.defenses.btidbf.inversion_metrics import InversionMetrics

    metrics = InversionMetrics("val")
    agree, disagree = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    victim = agree.repeat(4, 1)
    # clean: 2 of 4 flagged (false positives); poisoned: 3 of 4 flagged (true positives), 1 missed
    metrics.update_detection(torch.cat([disagree, disagree, agree, agree]), victim, poisoned=False)
    metrics.update_detection(torch.cat([disagree, disagree, disagree, agree]), victim, poisoned=True)

    class Identity(torch.nn.Module):  # features(x) = x, so distances are pixel distances
        def features(self, images):
            return images

    class Shift:  # the real trigger adds 0.2 to every pixel of every image
        def poisoned_test_images(self, labels):
            return torch.ones_like(labels, dtype=torch.bool)

        def apply(self, images):
            return images + 0.2

    images = torch.rand(3, 3, 4, 4)
    metrics.update_trigger(Identity(), lambda x: x + 0.1, Shift(), images, torch.zeros(3, dtype=torch.long))
    values = {k: float(v) for k, v in metrics.compute_and_reset(with_trigger=True).items()}
    assert values["val/detection_precision"] == pytest.approx(3 / 5)
    assert values["val/detection_recall"] == pytest.approx(3 / 4)
    assert values["val/detection_f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert values["val/generated_feature_distance"] == pytest.approx(0.01, rel=1e-4)  # G(x) - (x + 0.2) = -0.1
    assert values["val/trigger_feature_distance"] == pytest.approx(0.04, rel=1e-4)
    assert values["val/generated_trigger_cosine"] == pytest.approx(1.0)  # G shifts the features as the trigger does
    # reset: without an attack only the detection metrics are reported
    assert set(metrics.compute_and_reset(with_trigger=False)) == {
        "val/detection_precision",
        "val/detection_recall",
        "val/detection_f1",
    }
