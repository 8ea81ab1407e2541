"""BTI-DBF's training loop: phases and rounds with one optimizer per trained part; the algorithm
is in :mod:`.torch_model`, the schedule in :mod:`.schedule`, the evaluation beyond BA/ASR/RA in
:mod:`.inversion_metrics`. Longer than the other LightningModules because the method is: four
phases a round under manual optimization, each boundary a hook (a mask reset, the target vote,
the pretrained UNet handed on), and a checkpoint that must resume in the right phase."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_defense.data.datamodules import served_image_size
from lightning_defense.defenses.base import DefenseModule
from lightning_defense.defenses.btidbf.inversion_metrics import InversionMetrics
from lightning_defense.defenses.btidbf.schedule import PHASE_INDEX, Phase, PhaseName, RoundSchedule
from lightning_defense.defenses.btidbf.torch_model import Purification, TriggerInversion, Unlearning
from lightning_defense.defenses.components import LabelPermutation, ReprogrammedClassifier, TransformNet, save_defended
from lightning_defense.errors import ConfigurationError
from lightning_defense.io.run_folder import run_folder
from lightning_defense.training.callbacks import FigureRow
from lightning_defense.victims import Classifier, load_victim, save_repaired_victim


class BTIDBF(DefenseModule):
    """BTI-DBF around the victim in ``victim``, on *labeled* auxiliary data; subclasses choose the
    defense step: :class:`BTIDBFPurification` (P) or :class:`BTIDBFUnlearning` (U).

    The run is ``rounds`` rounds of: ``mask_epochs`` epochs of the feature mask, ``generator_epochs``
    of the backdoor generator, one epoch of votes on G(x), ``defense_epochs`` of the defense, after
    ``pretrain_epochs`` of pretraining the UNet (:func:`~.torch_model.pretrain_loss`). Round
    1's vote detects the target class; later rounds push G toward it, so their votes only report
    the share of G(x) that lands there (``train/generated_on_target``). The schedule sets
    ``trainer.max_epochs`` and validates after the pretraining and at the end of every round.
    Each part has its own Adam optimizer (manual optimization); the epoch decides the phase
    (``train/round``, 0 while pretraining; ``train/phase``: -1 pretraining, 0 mask, 1 generator,
    2 vote, 3 defense), and ``last.ckpt``
    (every ``checkpoint_every_n_epochs``) holds every part, every optimizer, the votes and the
    detected target, so a run resumes mid-phase and mid-round; resuming with another schedule is
    refused. Under DDP the parts idle in a phase have no gradient: use
    ``strategy: ddp_find_unused_parameters_true``.

    Validation logs, besides BA/ASR of the defended model and the victim: ``detected_target`` and
    ``dsr`` (1 when round 1's vote found the attack's target), detection precision/recall/F1 (an input is flagged
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
        replay_generators: not in the paper (off by default): from round 2, step 3 also trains on
            the earlier rounds' generators (a frozen copy of G is kept at the end of each round,
            saved in the checkpoint), so the defense cannot forget a trigger an earlier round found.
        pretrain_epochs: epochs of pretraining before round 1 (official: 50; 0, the default: none).
            With pretraining, G and the purifier are plain UNets that both start from the
            pretrained one, as in the official code: a loose, feature-keeping reconstruction of x
            that already drops part of a blended trigger. Without, G is a residual UNet near the
            identity and the purifier starts exactly at it, so it passes on whatever it was not
            trained to remove (why (P) fails on Blended without pretraining: benchmarks/README.md).
        pretrain_input_bound: see :class:`~.torch_model.TriggerInversion` (official: 0.1).
        pretrain_generator: with pretraining, G starts from the pretrained UNet too (official). Off
            (not in the official code; (P) only): only the purifier is pretrained and starts there,
            G stays the residual UNet near the identity, which keeps G(x) close to x: a plain,
            pretrained G is free to draw a whole image of one class, and the round-1 vote then
            finds that class instead of the backdoor's (Blended, benchmarks/README.md).
        encoder_name, encoder_depth, decoder_channels: the UNet of the generator (and purifier),
            a :class:`TransformNet`.
        checkpoint_every_n_epochs: how often at most ``last.ckpt`` is written (every n epochs, n the
            largest divisor of the run's length up to this, so that the final epoch is saved; BTI-DBF's epochs are short
            and its checkpoints hold two UNets with their optimizer states: each save takes about
            0.1 s, so every epoch would cost 15% more time on the embedded default).
    """

    model: TriggerInversion

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
        replay_generators: bool = False,
        pretrain_epochs: int = 0,
        pretrain_input_bound: float = 0.1,
        pretrain_generator: bool = True,
        encoder_name: str = "resnet18",
        encoder_depth: int = 4,
        decoder_channels: Sequence[int] = (256, 128, 64, 32),
        checkpoint_every_n_epochs: int = 5,
    ) -> None:
        victim_model = load_victim(victim)
        super().__init__(victim_model.num_classes)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.schedule = RoundSchedule(rounds, mask_epochs, generator_epochs, defense_epochs, pretrain_epochs)
        trigger_settings = {
            "input_bound": input_bound,
            "feature_bound": feature_bound,
            "benign_weight": benign_weight,
            "vote_noise": vote_noise,
            "poison_fraction": poison_fraction,
            "replay_generators": replay_generators,
            "pretrain_input_bound": pretrain_input_bound,
            "pretrain_generator": pretrain_generator,
        }
        self.model = self.build(victim_model, TransformNet(**self.generator_config()), trigger_settings)
        if pretrain_epochs:
            self.model.pretrained_network()  # fails now, naming the fix, when there is nothing to pretrain
        # not a buffer: DDP broadcasts buffers from rank 0 before every step, which would overwrite
        # the other ranks' counts; it travels in the checkpoint through on_save_checkpoint instead
        self.target_votes = torch.zeros(victim_model.num_classes, dtype=torch.long)
        self.val_inversion, self.test_inversion = InversionMetrics("val"), InversionMetrics("test")
        self.phase_seconds: dict[str, float] = {}

    def build(self, victim: Classifier, generator: TransformNet, settings: dict[str, Any]) -> TriggerInversion:
        """The plain-torch model of the variant."""
        raise NotImplementedError

    def generator_config(self, identity_init: bool = False, purifier: bool = False) -> dict[str, Any]:
        """The settings of G's UNet (or with ``purifier`` the purifier's). Not pretrained, it is
        residual: G starts near the identity, not at it (its loss has no gradient at the identity,
        and the input-distance bound pulls a random start inside first), the purifier
        (``identity_init``) at it. Pretrained, it is a plain UNet that takes the pretrained weights."""
        hp = self.hparams
        pretrained = hp.pretrain_epochs > 0 and (purifier or hp.pretrain_generator)
        residual = not pretrained
        return {
            "encoder_name": hp.encoder_name,
            "encoder_depth": hp.encoder_depth,
            "decoder_channels": list(hp.decoder_channels),
            "residual": residual,
            "identity_init": identity_init and residual,
        }

    @property
    def phase(self) -> Phase:
        # after the last epoch, fit's current_epoch is one past the schedule: report the last phase
        return self.schedule.at(min(self.current_epoch, self.schedule.total_epochs - 1))

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
        served = served_image_size(self.trainer.datamodule)
        if served is not None and tuple(served) != self.model.image_size:
            raise ConfigurationError(
                f"BTI-DBF shaped its feature mask for {self.model.image_size[0]}x{self.model.image_size[1]} images "
                f"(the victim records no size), but the data serves {served[0]}x{served[1]}: record the victim's size "
                "(`lightning wrap ... --image_size`) or serve images of its size."
            )
        self._validate_after_block(0)

    def _validate_after_block(self, epoch: int) -> None:
        # Lightning validates after epoch e when (e + 1) % check_val_every_n_epoch == 0; set per
        # epoch so that it happens after the pretraining and every round, whatever their lengths
        ends = self.schedule.ends_block(epoch)
        self.trainer.check_val_every_n_epoch = epoch + 1 if ends else self.schedule.total_epochs + 1

    def configure_callbacks(self) -> list[Callback]:
        """``last.ckpt`` every few training epochs (the CLI's default checkpoint is replaced), so an
        interruption loses at most ``checkpoint_every_n_epochs`` epochs of any phase."""
        if not self.trainer.checkpoint_callbacks:
            return []  # enable_checkpointing: false
        # the largest period up to the setting that divides the run, so that the final epoch is saved too
        total = self.schedule.total_epochs
        every = max(n for n in range(1, max(1, self.hparams.checkpoint_every_n_epochs) + 1) if total % n == 0)
        return [ModelCheckpoint(save_last=True, save_on_train_epoch_end=True, every_n_epochs=every)]

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
        if phase.first_epoch and phase.name == "pretrain":
            rank_zero_info(f"BTI-DBF: pretraining the UNet ({phase.epochs} epochs)")
        elif phase.first_epoch:
            rank_zero_info(
                f"BTI-DBF round {phase.round + 1}/{self.schedule.rounds}: {phase.name} ({phase.epochs} epochs)"
            )
        if phase.name == "mask" and phase.first_epoch and phase.round > 0:
            # a new mask for the new defended model, with a fresh optimizer state (official code);
            # the same on every rank, whatever each rank's random state
            mask = self.model.feature_mask
            mask.reset()
            mask.weight.data.copy_(self.trainer.strategy.broadcast(mask.weight.data, src=0))
            self.optimizers()[0].optimizer.state.clear()
        if phase.name == "detect" and phase.first_epoch:
            self.target_votes.zero_()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # here rather than at the epoch's start, which a run resumed mid-epoch skips: only the part
        # being trained gets gradients and train mode (BatchNorm statistics); the victim never does
        self._validate_after_block(self.current_epoch)
        trains = self.schedule.trained_parts(self.phase.name, self.hparams.pretrain_generator)
        self.model.feature_mask.requires_grad_(trains["mask"])
        self.model.generator.requires_grad_(trains["generator"]).train(trains["generator"])
        self.defense_part().train(trains["defense"])
        for parameter in self.defense_parameters():
            parameter.requires_grad_(trains["defense"])

    def defense_part(self) -> torch.nn.Module:
        raise NotImplementedError

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        phase = self.phase
        if phase.name == "detect":
            self.target_votes += self.model.target_votes(images, phase.round).cpu()
            return
        losses = self.model.phase_loss(phase, images, labels)
        optimizer = self.optimizers()[self._optimizer_index(phase.name)]
        optimizer.zero_grad()
        self.manual_backward(losses["loss"])
        optimizer.step()
        self.log_dict({f"train/{phase.name}_{k}": v for k, v in losses.items()}, on_step=False, on_epoch=True)
        self.log("train/round", float(phase.round + 1), on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/phase", float(PHASE_INDEX[phase.name]), on_step=False, on_epoch=True)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        phase = self.phase
        # after the last pretraining step, not at the epoch's end: validation comes before that
        # and must see the parts that start from the pretrained UNet
        if phase.name == "pretrain" and phase.last_epoch and batch_idx + 1 >= self.trainer.num_training_batches:
            self.model.end_pretraining()
            self.optimizers()[self._optimizer_index("pretrain")].optimizer.state.clear()  # a fresh Adam (official)

    def _optimizer_index(self, phase: PhaseName) -> int:
        return self.schedule.optimizer_index(phase, self.hparams.pretrain_generator)

    def on_train_epoch_end(self) -> None:
        phase = self.phase
        elapsed = time.monotonic() - getattr(self, "epoch_start", time.monotonic())
        self.phase_seconds[phase.name] = self.phase_seconds.get(phase.name, 0.0) + elapsed
        last_round = phase.round == self.schedule.rounds - 1
        if self.model.replay_generators and phase.name == "defense" and phase.last_epoch and not last_round:
            self.model.remember_generator()  # before ModelCheckpoint saves this epoch
        if phase.name == "detect":
            self._count_votes(phase)

    def _count_votes(self, phase: Phase) -> None:
        """Round 1's vote detects the target; later rounds' only report G(x)'s share on it."""
        votes = self.trainer.strategy.reduce(self.target_votes.to(self.device), reduce_op="sum").cpu()
        if phase.round == 0:
            self.model.detected_target.fill_(int(votes.argmax()))
            rank_zero_info(
                f"BTI-DBF round 1: detected target class {int(votes.argmax())} "
                f"(votes per class on G(x): {votes.tolist()})"
            )
            return
        # from round 2 G is trained toward the detected class: its share is no new detection
        detected = int(self.model.detected_target)
        share = float(votes[detected] / votes.sum())
        self.log("train/generated_on_target", share, on_step=False, on_epoch=True)
        rank_zero_info(
            f"BTI-DBF round {phase.round + 1}: G(x) lands on the detected class {detected} for "
            f"{share:.1%} of images (votes per class: {votes.tolist()})"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        phase = self.phase
        checkpoint["btidbf"] = {
            "round": phase.round,
            "phase": phase.name,
            "epoch_in_phase": phase.epoch,
            "phase_seconds": dict(self.phase_seconds),
            "target_votes": self.target_votes.tolist(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # the earlier rounds' generators must exist before the state dict is loaded into them
        prefix = "model.earlier_generators."
        kept = {key[len(prefix) :].split(".")[0] for key in checkpoint.get("state_dict", {}) if key.startswith(prefix)}
        while len(self.model.earlier_generators) < len(kept):
            self.model.remember_generator()
        state = checkpoint.get("btidbf", {})
        self.phase_seconds = dict(state.get("phase_seconds", {}))
        if "target_votes" in state:
            self.target_votes = torch.tensor(state["target_votes"], dtype=torch.long)
        if "round" in state and "epoch" in checkpoint:
            self.schedule.check_resumed((state["round"], state["phase"], state["epoch_in_phase"]), checkpoint["epoch"])

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
        """For :class:`~lightning_defense.training.callbacks.TransformGrid`: the images with the victim's and
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
        metrics: InversionMetrics = getattr(self, f"{stage}_inversion")
        metrics.update_detection(defended, victim, poisoned=dataloader_idx == 1)
        attack = getattr(self.trainer.datamodule, "attack", None)
        if dataloader_idx == 0 and attack is not None:
            metrics.update_trigger(self.victim, self.model.generator, attack, *batch[:2])

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate_btidbf(batch, dataloader_idx, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate_btidbf(batch, dataloader_idx, "test")

    def _log_btidbf(self, stage: str) -> None:
        attack = getattr(self.trainer.datamodule, "attack", None)
        self.log_dict(getattr(self, f"{stage}_inversion").compute_and_reset(with_trigger=attack is not None))
        detected = int(self.model.detected_target)
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
        input_weight, generated_batch, purifier_noise, input_bound_purifier: step 3's loss, see
            :class:`~.torch_model.Purification`; the defaults follow the paper's two-term loss,
            ``configs/btidbf/official_purifier.yaml`` the official code's.
        defense_lr: the purifier's Adam learning rate (official: 1e-3).
    """

    model: Purification

    def __init__(
        self,
        victim: str,
        input_weight: float = 1.0,
        generated_batch: bool = True,
        purifier_noise: float = 0.0,
        input_bound_purifier: float | None = None,
        defense_lr: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        self._purifier_settings = {
            "input_weight": input_weight,
            "generated_batch": generated_batch,
            "purifier_noise": purifier_noise,
            "input_bound_purifier": input_bound_purifier,
        }
        super().__init__(victim, defense_lr=defense_lr, **kwargs)

    def build(self, victim: Classifier, generator: TransformNet, settings: dict[str, Any]) -> Purification:
        purifier = TransformNet(**self.generator_config(identity_init=True, purifier=True))
        return Purification(victim, generator, purifier, **self._purifier_settings, **settings)

    def defense_part(self) -> torch.nn.Module:
        return self.model.purifier

    def defense_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.purifier.parameters())

    def figure_rows(self, name: str, images: Tensor) -> list[FigureRow]:
        purified = self.model.purifier(images).float()
        predictions = self.victim(purified).argmax(1)  # f(Ĝ(x)), reusing Ĝ(x)
        return [*super().figure_rows(name, images), (f"Ĝ({name})", purified, [f"f∘Ĝ: {int(p)}" for p in predictions])]

    def export(self, folder: Path) -> Path:
        pipeline = ReprogrammedClassifier(
            self.victim, self.model.purifier, LabelPermutation(self.victim.num_classes, enabled=False)
        )
        return save_defended(
            folder / "defended.safetensors",
            pipeline,
            self.hparams.victim,
            self.generator_config(identity_init=True, purifier=True),
        )


class BTIDBFUnlearning(BTIDBF):
    """BTI-DBF (U): a copy of the victim is fine-tuned to unlearn the inverted trigger; the victim
    itself is untouched. The repaired copy is written as ``repaired_victim.safetensors``, a victim
    file with the original's metadata, usable wherever a victim is.

    Args:
        defense_lr: the copy's Adam learning rate (official: 1e-4).
    """

    model: Unlearning

    def __init__(self, victim: str, defense_lr: float = 1e-4, **kwargs: Any) -> None:
        super().__init__(victim, defense_lr=defense_lr, **kwargs)

    def build(self, victim: Classifier, generator: TransformNet, settings: dict[str, Any]) -> Unlearning:
        return Unlearning(victim, generator, **settings)

    def defense_part(self) -> torch.nn.Module:
        return self.model.repaired

    def defense_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.repaired.parameters())

    def export(self, folder: Path) -> Path:
        return save_repaired_victim(
            folder / "repaired_victim.safetensors", self.model.repaired, self.hparams.victim, "BTI-DBF (U)"
        )
