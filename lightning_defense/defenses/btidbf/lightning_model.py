"""BTI-DBF's training loop: phases and rounds with one optimizer per trained part; the algorithm
is in :mod:`.torch_model`."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import BinaryF1Score, BinaryPrecision, BinaryRecall

from lightning_defense.callbacks import FigureRow, run_folder
from lightning_defense.defenses.base import DefenseModule
from lightning_defense.defenses.btidbf.torch_model import (
    Phase,
    Purification,
    RoundSchedule,
    TriggerInversion,
    Unlearning,
)
from lightning_defense.defenses.refine.deploy import save_defended
from lightning_defense.defenses.refine.torch_model import LabelPermutation, Refine
from lightning_defense.defenses.transform_net import TransformNet
from lightning_defense.errors import ConfigurationError
from lightning_defense.victims import Classifier, load_victim, read_victim_metadata, save_victim
from lightning_defense.victims.victim_file import VictimMetadata

OPTIMIZER_BY_PHASE = {"mask": 0, "generator": 1, "defense": 2}


class BTIDBF(DefenseModule):
    """BTI-DBF around the victim in ``victim``, on *labeled* auxiliary data; subclasses choose the
    defense step: :class:`BTIDBFPurification` (P) or :class:`BTIDBFUnlearning` (U).

    The run is ``rounds`` rounds of: ``mask_epochs`` epochs of the feature mask, ``generator_epochs``
    of the backdoor generator, one epoch voting for the target class, ``defense_epochs`` of the
    defense. The schedule sets ``trainer.max_epochs``; validate once a round with
    ``check_val_every_n_epoch`` = the round's length (the configs do). Each part has its own Adam
    optimizer (manual optimization); the epoch decides the phase, and the checkpoint holds every
    part, every optimizer, the votes and the detected target, so a run resumes mid-phase and
    mid-round. Under DDP the parts idle in a phase have no gradient: use
    ``strategy: ddp_find_unused_parameters_true``.

    Validation logs, besides BA/ASR of the defended model and the victim: ``detected_target`` and
    ``dsr`` (1 when it is the attack's target), detection precision/recall/F1 (an input is flagged
    poisoned when the victim and the defended model disagree; clean test images are the negatives,
    poisoned ones the positives), the S_a feature distance between G(x) and the true poisoned x
    (beside that of clean x, for scale), and the cosine between the feature changes that G and the
    real trigger make (``generated_trigger_cosine``: 1 when G moves the features the trigger's way).

    Args:
        victim: path of the frozen victim.
        rounds, mask_epochs, generator_epochs, defense_epochs: the schedule (official: 5, 20, 30, 30).
        mask_lr, generator_lr, defense_lr: Adam learning rates (official: 0.01, 1e-3, and the
            defense's own).
        input_bound, feature_bound, benign_weight, vote_noise, poison_fraction: see
            :class:`~.torch_model.TriggerInversion`.
        encoder_name, encoder_depth, decoder_channels: the UNet of the generator (and purifier),
            a residual :class:`TransformNet` that starts as the identity.
    """

    def __init__(
        self,
        victim: str,
        rounds: int = 5,
        mask_epochs: int = 20,
        generator_epochs: int = 30,
        defense_epochs: int = 30,
        mask_lr: float = 0.01,
        generator_lr: float = 1e-3,
        defense_lr: float = 1e-3,
        input_bound: float = 0.3,
        feature_bound: float = 3.0,
        benign_weight: float = 0.01,
        vote_noise: float = 0.03,
        poison_fraction: float = 0.1,
        encoder_name: str = "resnet18",
        encoder_depth: int = 4,
        decoder_channels: Sequence[int] = (256, 128, 64, 32),
    ) -> None:
        victim_model = load_victim(victim)
        super().__init__(victim_model.num_classes)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.schedule = RoundSchedule(rounds, mask_epochs, generator_epochs, defense_epochs)
        trigger_settings = {
            "input_bound": input_bound,
            "feature_bound": feature_bound,
            "benign_weight": benign_weight,
            "vote_noise": vote_noise,
            "poison_fraction": poison_fraction,
        }
        self.model = self.build(victim_model, TransformNet(**self.generator_config()), trigger_settings)
        self.register_buffer("target_votes", torch.zeros(victim_model.num_classes, dtype=torch.long))
        for stage in ("val", "test"):
            detection = MetricCollection(
                {"precision": BinaryPrecision(), "recall": BinaryRecall(), "f1": BinaryF1Score()},
                prefix=f"{stage}/detection_",
            )
            setattr(self, f"{stage}_detection", detection)
            setattr(self, f"{stage}_generated_distance", MeanMetric())
            setattr(self, f"{stage}_trigger_distance", MeanMetric())
            setattr(self, f"{stage}_trigger_cosine", MeanMetric())
        self.phase_seconds: dict[str, float] = {}

    def build(self, victim: Classifier, generator: TransformNet, settings: dict[str, float]) -> TriggerInversion:
        """The plain-torch model of the variant."""
        raise NotImplementedError

    def generator_config(self, identity_init: bool = False) -> dict[str, Any]:
        """The UNet's settings. The generator starts near the identity, not at it: its loss has no
        gradient at the identity, and the input-distance bound pulls a random start inside first
        (the official code pretrains it toward the identity instead). The purifier starts at it."""
        hp = self.hparams
        return {
            "encoder_name": hp.encoder_name,
            "encoder_depth": hp.encoder_depth,
            "decoder_channels": list(hp.decoder_channels),
            "residual": True,
            "identity_init": identity_init,
        }

    @property
    def victim(self) -> Classifier:
        return self.model.victim

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    @property
    def phase(self) -> Phase:
        return self.schedule.at(self.current_epoch)

    # -- training -------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if "configure_optimizers" in vars(self):  # LightningCLI patches it in for an `optimizer:` section
            raise ConfigurationError(
                "BTI-DBF trains each part with its own optimizer: remove the `optimizer:`/`lr_scheduler:` "
                "section of the config and set model.init_args.mask_lr, generator_lr and defense_lr instead."
            )
        if stage == "fit" and self.trainer.max_epochs != self.schedule.total_epochs:
            rank_zero_info(
                f"BTI-DBF: {self.schedule.rounds} rounds of {self.schedule.round_epochs} epochs, "
                f"so max_epochs = {self.schedule.total_epochs} (was {self.trainer.max_epochs})."
            )
            self.trainer.fit_loop.max_epochs = self.schedule.total_epochs

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        return [
            torch.optim.Adam(self.model.feature_mask.parameters(), lr=hp.mask_lr),
            torch.optim.Adam(self.model.generator.parameters(), lr=hp.generator_lr),
            torch.optim.Adam(self.defense_parameters(), lr=hp.defense_lr),
        ]

    def defense_parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def on_train_epoch_start(self) -> None:
        phase = self.phase
        self.epoch_start = time.monotonic()
        if phase.first_epoch:
            rank_zero_info(
                f"BTI-DBF round {phase.round + 1}/{self.schedule.rounds}: {phase.name} ({phase.epochs} epochs)"
            )
        if phase.name == "mask" and phase.first_epoch and phase.round > 0:
            # a new mask for the new defended model, with a fresh optimizer state (official code)
            self.model.feature_mask.reset()
            self.optimizers()[0].optimizer.state.clear()
        if phase.name == "detect" and phase.first_epoch:
            self.target_votes.zero_()
        self.model.feature_mask.requires_grad_(phase.name == "mask")
        self.model.generator.requires_grad_(phase.name == "generator")
        for parameter in self.defense_parameters():
            parameter.requires_grad_(phase.name == "defense")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # only the part being trained is in train mode (BatchNorm statistics); the victim never is
        name = self.phase.name
        self.model.generator.train(name == "generator")
        self.defense_part().train(name == "defense")

    def defense_part(self) -> torch.nn.Module:
        raise NotImplementedError

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        phase = self.phase
        if phase.name == "detect":
            self.target_votes += self.model.target_votes(images)
            return
        if phase.name == "mask":
            losses = self.model.mask_loss(images, labels)
        elif phase.name == "generator":
            losses = self.model.generator_loss(images, phase.round)
        else:
            losses = self.model.defense_loss(images, labels)
        optimizer = self.optimizers()[OPTIMIZER_BY_PHASE[phase.name]]
        optimizer.zero_grad()
        self.manual_backward(losses["loss"])
        optimizer.step()
        self.log_dict({f"train/{phase.name}_{k}": v for k, v in losses.items()}, on_step=False, on_epoch=True)
        self.log("train/round", float(phase.round + 1), on_step=False, on_epoch=True, prog_bar=True)

    def on_train_epoch_end(self) -> None:
        phase = self.phase
        elapsed = time.monotonic() - getattr(self, "epoch_start", time.monotonic())
        self.phase_seconds[phase.name] = self.phase_seconds.get(phase.name, 0.0) + elapsed
        if phase.name == "detect":
            votes = self.trainer.strategy.reduce(self.target_votes.clone(), reduce_op="sum")
            self.model.detected_target.fill_(int(votes.argmax()))
            rank_zero_info(
                f"BTI-DBF round {phase.round + 1}: detected target class {int(votes.argmax())} "
                f"(votes per class on G(x): {votes.tolist()})"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        phase = self.phase
        checkpoint["btidbf"] = {
            "round": phase.round,
            "phase": phase.name,
            "epoch_in_phase": phase.epoch,
            "phase_seconds": dict(self.phase_seconds),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.phase_seconds = dict(checkpoint.get("btidbf", {}).get("phase_seconds", {}))

    def on_train_end(self) -> None:
        folder = run_folder(self.trainer)  # on every rank: it is a collective under DDP
        if self.trainer.is_global_zero:
            path = self.export(folder)
            (folder / "phase_seconds.json").write_text(json.dumps(self.phase_seconds, indent=1))
            seconds = ", ".join(f"{name} {s / 60:.1f} min" for name, s in self.phase_seconds.items())
            rank_zero_info(f"BTI-DBF wall time per phase: {seconds}. Defense written to {path}")

    def export(self, folder: Path) -> Path:
        raise NotImplementedError

    # -- evaluation -------------------------------------------------------------------------------

    def figure_rows(self, name: str, images: Tensor) -> list[FigureRow]:
        """For :class:`~lightning_defense.callbacks.TransformGrid`: the images with the victim's and
        the defended model's predictions; for clean images also the inverted trigger G(x) and its
        change, magnified, with the victim's prediction on G(x)."""
        victim, defended = self.victim(images).argmax(1), self(images).argmax(1)
        rows = [(name, images, [f"f: {int(v)}, defended: {int(d)}" for v, d in zip(victim, defended)])]
        if name == "clean":
            generated = self.model.generator(images).float()
            on_generated = self.victim(generated).argmax(1)
            change = ((generated - images) * 5 + 0.5).clamp(0, 1)  # x5 around grey
            rows.append(("G(clean)", generated, [f"f: {int(p)}" for p in on_generated]))
            rows.append(("G(x) - x, x5", change, ["" for _ in images]))
        return rows

    def _evaluate_btidbf(self, batch: tuple[Tensor, Tensor], dataloader_idx: int, stage: str) -> None:
        defended, victim = self._evaluate(batch, dataloader_idx, stage)
        flagged = defended.argmax(dim=1) != victim.argmax(dim=1)
        getattr(self, f"{stage}_detection").update(flagged, torch.full_like(flagged, dataloader_idx == 1))
        attack = getattr(self.trainer.datamodule, "attack", None)
        if dataloader_idx != 0 or attack is None:
            return
        images, labels = batch
        images = images[attack.poisoned_test_images(labels)]
        if len(images) == 0:
            return
        poisoned = self.victim.features(attack.apply(images.float())).float().flatten(1)
        generated = self.victim.features(self.model.generator(images)).float().flatten(1)
        clean = self.victim.features(images).float().flatten(1)
        getattr(self, f"{stage}_generated_distance").update((generated - poisoned).pow(2).mean(dim=1))
        getattr(self, f"{stage}_trigger_distance").update((clean - poisoned).pow(2).mean(dim=1))
        # does G move the features the way the real trigger does? (1: same direction, 0: unrelated)
        cosine = torch.nn.functional.cosine_similarity(generated - clean, poisoned - clean, dim=1)
        getattr(self, f"{stage}_trigger_cosine").update(cosine)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate_btidbf(batch, dataloader_idx, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate_btidbf(batch, dataloader_idx, "test")

    def _log_btidbf(self, stage: str) -> None:
        detection = getattr(self, f"{stage}_detection")
        self.log_dict(detection.compute())
        detection.reset()
        names = {"generated_distance": "generated_feature_distance", "trigger_distance": "trigger_feature_distance"}
        names["trigger_cosine"] = "generated_trigger_cosine"
        for attribute, key in names.items():
            metric = getattr(self, f"{stage}_{attribute}")
            if metric.update_count:
                self.log(f"{stage}/{key}", metric.compute())
            metric.reset()
        detected = int(self.model.detected_target)
        attack = getattr(self.trainer.datamodule, "attack", None)
        if detected >= 0:
            # the same on every rank; sync_dist only keeps Lightning from warning under DDP
            self.log(f"{stage}/detected_target", float(detected), sync_dist=True)
            if attack is not None and attack.label_mode == "all_to_one":
                self.log(f"{stage}/dsr", float(detected == attack.target), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_btidbf("val")

    def on_test_epoch_end(self) -> None:
        self._log_btidbf("test")


class BTIDBFPurification(BTIDBF):
    """BTI-DBF (P): a purifier Ĝ (the generator's UNet) in front of the victim; the defended model
    is f(Ĝ(x)), exported as ``defended.safetensors`` (load it with
    :func:`~lightning_defense.defenses.refine.load_defended`: an input transform in front of the
    victim, with the identity label permutation).

    Args:
        input_weight: weight of the purifier's input distance ‖x − Ĝ(·)‖² (see
            :class:`~.torch_model.Purification`).
        defense_lr: the purifier's Adam learning rate (official: 1e-3).
    """

    def __init__(self, victim: str, input_weight: float = 1.0, defense_lr: float = 1e-3, **kwargs: Any) -> None:
        self._input_weight = input_weight
        super().__init__(victim, defense_lr=defense_lr, **kwargs)

    def build(self, victim: Classifier, generator: TransformNet, settings: dict[str, float]) -> Purification:
        purifier = TransformNet(**self.generator_config(identity_init=True))
        return Purification(victim, generator, purifier, input_weight=self._input_weight, **settings)

    def defense_part(self) -> torch.nn.Module:
        return self.model.purifier

    def defense_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.purifier.parameters())

    def figure_rows(self, name: str, images: Tensor) -> list[FigureRow]:
        purified = self.model.purifier(images).float()
        predictions = self(images).argmax(1)
        return [*super().figure_rows(name, images), (f"Ĝ({name})", purified, [f"f∘Ĝ: {int(p)}" for p in predictions])]

    def export(self, folder: Path) -> Path:
        pipeline = Refine(self.victim, self.model.purifier, LabelPermutation(self.victim.num_classes, enabled=False))
        return save_defended(
            folder / "defended.safetensors", pipeline, self.hparams.victim, self.generator_config(identity_init=True)
        )


class BTIDBFUnlearning(BTIDBF):
    """BTI-DBF (U): a copy of the victim is fine-tuned to unlearn the inverted trigger; the victim
    itself is untouched. The repaired copy is written as ``repaired_victim.safetensors``, a victim
    file with the original's metadata, usable wherever a victim is.

    Args:
        defense_lr: the copy's Adam learning rate (official: 1e-4).
    """

    def __init__(self, victim: str, defense_lr: float = 1e-4, **kwargs: Any) -> None:
        super().__init__(victim, defense_lr=defense_lr, **kwargs)

    def build(self, victim: Classifier, generator: TransformNet, settings: dict[str, float]) -> Unlearning:
        return Unlearning(victim, generator, **settings)

    def defense_part(self) -> torch.nn.Module:
        return self.model.repaired

    def defense_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.repaired.parameters())

    def export(self, folder: Path) -> Path:
        victim = self.victim
        metadata = read_victim_metadata(self.hparams.victim) or VictimMetadata(
            victim.arch, victim.num_classes, victim.mean.flatten().tolist(), victim.std.flatten().tolist()
        )
        metadata.extra = {**metadata.extra, "repaired_by": "BTI-DBF (U)", "repaired_from": str(self.hparams.victim)}
        return save_victim(folder / "repaired_victim.safetensors", self.model.repaired, metadata)
