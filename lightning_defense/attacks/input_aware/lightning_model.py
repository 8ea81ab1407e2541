"""Training an IAD victim: the classifier and the attack's generators learn together (the attack
cannot poison a data set beforehand, see :mod:`lightning_defense.attacks.input_aware`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_defense.attacks.base import LabelMode
from lightning_defense.attacks.input_aware.torch_model import (
    InputAware,
    InputAwareGenerators,
    mask_pretraining_losses,
    partners,
    save_generators,
)
from lightning_defense.data.datamodules import served_image_size
from lightning_defense.deprecation import warn_renamed
from lightning_defense.errors import ConfigurationError
from lightning_defense.io.run_folder import run_folder
from lightning_defense.io.safetensors_files import sha256
from lightning_defense.training.optim import sgd_multistep
from lightning_defense.training.victim_task import VictimTask
from lightning_defense.victims.classifier import CIFAR10_MEAN, CIFAR10_STD


def adam_multistep(
    parameters: Iterable[nn.Parameter], lr: float, betas: Sequence[float], milestones: Sequence[int], gamma: float
) -> dict[str, Any]:
    """``configure_optimizers`` entry of a generator: Adam and a multi-step decay (official IAD)."""
    optimizer = torch.optim.Adam(parameters, lr=lr, betas=(betas[0], betas[1]))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma)
    return {"optimizer": optimizer, "lr_scheduler": scheduler}


class InputAwareVictimTask(VictimTask):
    """Trains an IAD victim (Nguyen & Tran, NeurIPS 2020) as the authors' ``train.py`` does: the
    mask generator alone for ``mask_epochs`` epochs (norm loss toward ``mask_density`` plus the
    diversity loss), then, with the mask generator frozen, the classifier and the trigger
    generator together on batches whose first ``poison_rate`` carries its own trigger and the
    attacker's label and whose next ``cross_rate`` carries another image's trigger and its true
    label, with the trigger generator's diversity loss (see
    :meth:`~lightning_defense.attacks.input_aware.InputAware.poison_training_batch`).

    The DataModule serves clean data (``attack: null``). ``trainer.max_epochs`` counts both
    phases, so the backdoor phase has ``max_epochs - mask_epochs`` epochs; learning-rate
    milestones count the epochs of their own phase. Each part has its own optimizer (manual
    optimization): the classifier SGD with :class:`VictimTask`'s recipe (``lr``,
    ``momentum``, ``weight_decay``, ``lr_milestones``, ``lr_gamma``; a config's
    ``optimizer:``/``lr_scheduler:`` sections are refused, they would also train the
    generators), each generator Adam with a multi-step decay. The generators are submodules,
    so ``last.ckpt`` and DDP carry them; the phase follows from the epoch, so a run resumes in
    either phase. Under DDP the idle parts of each phase have no gradient: use
    ``strategy: ddp_find_unused_parameters_true``.

    Validation and test log BA and ASR (clean test images, and those of them not of the target
    class (all-to-one) poisoned with the current generators), ``cross_acc`` (accuracy on test
    images carrying another image's trigger; the official "cross-trigger test") and
    ``mask_density`` (the mean mask; validation in the mask phase logs only this). The mask
    loss is ``lambda_norm * norm + lambda_div * diversity`` (the official code multiplies its
    diversity term by ``lambda_div`` twice, the same with its default 1). At the end of training
    ``generators.safetensors`` is written in the run folder and the victim file's attack is
    ``InputAware`` naming it (absolute path) with its SHA-256, so defenses rebuild the poisoned
    test set from the victim file alone.

    Args:
        target, label_mode, poison_rate, cross_rate: the attack, see
            :class:`~lightning_defense.attacks.input_aware.InputAware` (official ``target_label``
            0, ``attack_mode``, ``p_attack`` 0.1, ``p_cross`` 0.1).
        mask_density: the share of pixels the mask may cover (official 0.032).
        lambda_div: weight of the diversity losses (official 1).
        lambda_norm: weight of the mask's norm loss (official 100).
        mask_epochs: epochs of mask pretraining (official 25).
        generator_lr, generator_betas, generator_milestones, generator_gamma: Adam of the trigger
            generator (official ``lr_G`` 0.01, betas (0.5, 0.9), milestones 200, 300, 400, 500,
            0.1).
        mask_lr, mask_betas, mask_milestones, mask_gamma: Adam of the mask generator (official
            ``lr_M`` 0.01, (0.5, 0.9), 10 and 20, 0.1).
        generator_width, generator_depth: the two generators' :class:`EncoderDecoder` (official
            CIFAR-10 network: 32, 3).
        generators_name: file name of the generators in the run folder.

    The classifier's arguments are :class:`VictimTask`'s (the official classifier recipe is
    SGD ``lr_C`` 0.01, milestones 100, 200, 300, 400 of 600 epochs).
    """

    def __init__(
        self,
        arch: str = "resnet20",
        num_classes: int = 10,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_milestones: Sequence[int] = (100, 150),
        lr_gamma: float = 0.1,
        channels_last: bool | None = None,
        export_name: str = "victim.safetensors",
        target: int = 0,
        label_mode: LabelMode = "all_to_one",
        poison_rate: float = 0.1,
        cross_rate: float = 0.1,
        mask_density: float = 0.032,
        lambda_div: float = 1.0,
        lambda_norm: float = 100.0,
        mask_epochs: int = 25,
        generator_lr: float = 0.01,
        generator_betas: Sequence[float] = (0.5, 0.9),
        generator_milestones: Sequence[int] = (200, 300, 400, 500),
        generator_gamma: float = 0.1,
        mask_lr: float = 0.01,
        mask_betas: Sequence[float] = (0.5, 0.9),
        mask_milestones: Sequence[int] = (10, 20),
        mask_gamma: float = 0.1,
        generator_width: int = 32,
        generator_depth: int = 3,
        generators_name: str = "generators.safetensors",
    ) -> None:
        super().__init__(
            arch,
            num_classes,
            mean,
            std,
            lr,
            momentum,
            weight_decay,
            lr_milestones,
            lr_gamma,
            channels_last=channels_last,
            export_name=export_name,
        )
        self.save_hyperparameters()
        if not 0 < mask_density < 1 or mask_epochs < 0:
            raise ConfigurationError(
                f"mask_density must be in (0, 1) and mask_epochs >= 0, got {mask_density} and {mask_epochs}."
            )
        self.automatic_optimization = False
        # the label and batch rules of the attack; the generators it will name exist after training
        self.attack = InputAware(target, poison_rate, label_mode, cross_rate)
        self.generators = InputAwareGenerators(len(mean), generator_width, generator_depth, mean, std)
        for stage in ("val", "test"):
            setattr(self, f"{stage}_cross_accuracy", MulticlassAccuracy(num_classes, average="micro"))
            setattr(self, f"{stage}_mask_density", MeanMetric())

    # -- training -------------------------------------------------------------------------------

    @property
    def in_mask_phase(self) -> bool:
        return self.current_epoch < self.hparams.mask_epochs

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if getattr(datamodule, "attack", None) is not None:
            raise ConfigurationError(
                "IAD poisons the training batches itself, with generators it trains: the DataModule must serve "
                "clean data. Set data.init_args.attack: null and the attack's settings in model.init_args "
                "(target, label_mode, poison_rate, cross_rate)."
            )
        super().setup(stage)
        if self.channels_last:
            self.generators.to(memory_format=torch.channels_last)
        if "configure_optimizers" in vars(self):  # LightningCLI patches it in for an `optimizer:` section
            raise ConfigurationError(
                "InputAwareVictimTask trains the classifier and each generator with its own optimizer: remove the "
                "`optimizer:`/`lr_scheduler:` sections of the config and set model.init_args.lr, momentum, "
                "weight_decay, lr_milestones, lr_gamma (classifier), generator_lr and mask_lr instead."
            )
        max_epochs = self.trainer.max_epochs
        smoke = self.trainer.fast_dev_run  # a few steps of the mask phase only: a smoke test, no victim to judge
        if stage == "fit" and not smoke and max_epochs is not None and 0 <= max_epochs <= self.hparams.mask_epochs:
            raise ConfigurationError(
                f"trainer.max_epochs ({max_epochs}) leaves no epoch to train the backdoor after "
                f"{self.hparams.mask_epochs} mask epochs: set max_epochs to mask_epochs + the backdoor's epochs."
            )
        image_size = served_image_size(datamodule)
        if image_size is not None:
            self.attack.check(tuple(image_size), self.hparams.num_classes)
            self.generators.check_image_size(image_size)
        if datamodule is not None:
            batch_size = getattr(datamodule, "batch_size", None)
            if batch_size is not None and self.attack.batch_counts(batch_size)[0] < 1:
                raise ConfigurationError(
                    f"poison_rate {self.attack.poison_rate} poisons no image of a batch of {batch_size} (IAD poisons "
                    "a share of every batch, rounded down): raise the batch size or the poison rate."
                )
        self.attack_config = self.attack.config()

    def configure_optimizers(self) -> list[dict[str, Any]]:
        hp = self.hparams
        return [
            sgd_multistep(
                self.classifier.parameters(), hp.lr, hp.momentum, hp.weight_decay, hp.lr_milestones, hp.lr_gamma
            ),
            adam_multistep(
                self.generators.trigger_generator.parameters(),
                hp.generator_lr,
                hp.generator_betas,
                hp.generator_milestones,
                hp.generator_gamma,
            ),
            adam_multistep(
                self.generators.mask_generator.parameters(),
                hp.mask_lr,
                hp.mask_betas,
                hp.mask_milestones,
                hp.mask_gamma,
            ),
        ]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # here rather than at the epoch's start, which a run resumed mid-epoch skips (Lightning also
        # puts every submodule in train mode after each validation): the mask generator trains
        # alone first, then is frozen (eval mode, no gradient) while the others train
        masking = self.in_mask_phase
        self.generators.mask_generator.train(masking).requires_grad_(masking)
        for part in (self.classifier, self.generators.trigger_generator):
            part.train(not masking).requires_grad_(not masking)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        classifier_optimizer, trigger_optimizer, mask_optimizer = self.optimizers()
        if self.in_mask_phase:
            losses = mask_pretraining_losses(self.generators, images, self.hparams.mask_density)
            loss = self.hparams.lambda_norm * losses["norm"] + self.hparams.lambda_div * losses["diversity"]
            mask_optimizer.zero_grad()
            self.manual_backward(loss)
            mask_optimizer.step()
            epoch_means = {f"train/mask_{k}": v for k, v in losses.items()}
            self.log_dict(epoch_means, on_step=False, on_epoch=True, sync_dist=True)
            self.log("train/mask_loss", loss, prog_bar=True)
            return loss
        poisoned = self.attack.poison_training_batch(self.generators, images, labels, self.hparams.num_classes)
        cross_entropy = F.cross_entropy(self(poisoned.images), poisoned.labels)
        loss = cross_entropy + self.hparams.lambda_div * poisoned.diversity
        classifier_optimizer.zero_grad()
        trigger_optimizer.zero_grad()
        self.manual_backward(loss)
        classifier_optimizer.step()
        trigger_optimizer.step()
        self.log("train/loss", loss, prog_bar=True)
        epoch_means = {"train/cross_entropy": cross_entropy, "train/diversity": poisoned.diversity}
        self.log_dict(epoch_means, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def on_train_epoch_end(self) -> None:
        classifier_scheduler, trigger_scheduler, mask_scheduler = self.lr_schedulers()
        if self.in_mask_phase:
            mask_scheduler.step()
        else:
            classifier_scheduler.step()
            trigger_scheduler.step()

    # -- evaluation -----------------------------------------------------------------------------

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        """The mask density; then BA on the clean batch, ASR on its images that the attack counts
        (all-to-one: not of the target class) with their own trigger, and cross accuracy with
        their partner's trigger. Validation in the mask phase reports the mask density alone:
        the classifier and the trigger generator have not started training."""
        images, labels = batch[:2]
        masks = self.generators.masks(images)
        density = getattr(self, f"{stage}_mask_density")
        density.update(masks.float().mean(dim=(1, 2, 3)))
        self.log(f"{stage}/mask_density", density, on_step=False, on_epoch=True)
        if stage == "val" and self.in_mask_phase:
            return
        patterns = self.generators.patterns(images)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(self, self(images), labels, 0)
        keep = self.attack.poisoned_test_images(labels)
        if keep.any():
            poisoned = self.generators.blend(images[keep], patterns[keep], masks[keep])
            attacker_labels = self.attack.poison_labels(labels[keep], self.hparams.num_classes)
            metrics.update(self, self(poisoned), attacker_labels, 1, labels[keep])
        # in eval mode each image's pattern and mask depend on that image alone: rolled, they are the partners'
        crossed = self.generators.blend(images, partners(patterns), partners(masks))
        cross_accuracy = getattr(self, f"{stage}_cross_accuracy")
        cross_accuracy.update(self(crossed).float(), labels)
        self.log(f"{stage}/cross_acc", cross_accuracy, on_step=False, on_epoch=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test")

    # -- export ---------------------------------------------------------------------------------

    def trained_with(self) -> dict[str, Any]:
        """The training recipe, recorded in the generators file."""
        hp = self.hparams
        names = ("mask_density", "lambda_div", "lambda_norm", "mask_epochs", "generator_lr", "mask_lr")
        return {"epochs": self.current_epoch, **{name: hp[name] for name in names}}

    def export_generators(self, path: str | Path) -> InputAware:
        """Write the generators and return the attack that poisons with them."""
        path = save_generators(path, self.generators, self.trained_with()).resolve()
        settings = self.attack.config()["init_args"]
        return InputAware(**{**settings, "generators_file": str(path), "generators_sha256": sha256(path)})

    def on_train_end(self) -> None:
        folder = run_folder(self.trainer)  # on every rank: it is a collective under DDP
        if self.trainer.is_global_zero:
            attack = self.export_generators(folder / self.hparams.generators_name)
            self.attack_config = attack.config()
            rank_zero_info(f"IAD generators written to {attack.generators_file}")
        super().on_train_end()


class InputAwareVictimTrainer(InputAwareVictimTask):
    """The earlier name of :class:`InputAwareVictimTask` (configs naming it keep working for one release)."""

    def __init__(self, **kwargs: Any) -> None:
        warn_renamed("InputAwareVictimTrainer", "InputAwareVictimTask")
        super().__init__(**kwargs)
