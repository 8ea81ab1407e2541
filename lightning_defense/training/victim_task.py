"""Training a (backdoored) victim: the attack lives in the DataModule, the network here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_defense.data.datamodules import served_image_size
from lightning_defense.deprecation import warn_renamed
from lightning_defense.errors import ConfigurationError, check_class_count, check_image_size
from lightning_defense.io.run_folder import run_folder
from lightning_defense.metrics import LABELS, REPORTED, BackdoorMetrics, split_batch
from lightning_defense.training.hardware import uses_channels_last
from lightning_defense.training.optim import sgd_multistep
from lightning_defense.victims.classifier import CIFAR10_MEAN, CIFAR10_STD, Classifier
from lightning_defense.victims.victim_file import VictimMetadata, save_victim


class VictimTask(LightningModule):
    """Trains a classifier on the DataModule's (poisoned) training set; logs BA and ASR.

    The default optimizer is the seeds' recipe: SGD with momentum and weight decay and a
    multi-step learning-rate decay. A config's ``optimizer``/``lr_scheduler`` sections replace it.
    At the end of training the weights and the attack and data settings are written as
    ``victim.safetensors`` in the run folder (see :mod:`lightning_defense.victims.victim_file`).

    Args:
        arch: see :mod:`lightning_defense.victims.architectures`: this project's names,
            ``torchvision/<builder>`` or ``timm/<name>`` (e.g. ``torchvision/resnet18``).
        num_classes: must match the DataModule's.
        mean, std: per-channel normalization applied inside the classifier.
        image_size: ``[height, width]`` for networks built for one input size (ViTs); must
            match the DataModule's images.
        feature_node: where trigger-inversion defenses split this network into features and
            head, if not the default (see :class:`~lightning_defense.victims.Classifier`).
        channels_last: NHWC layout for this module; ``None`` (default) follows the Trainer's
            ``channels_last`` (see :func:`lightning_defense.training.hardware.uses_channels_last`).
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
        image_size: tuple[int, int] | None = None,
        feature_node: str | None = None,
    ) -> None:
        super().__init__()
        # a name inside the run folder: a path could overwrite any file of the user's
        bare = Path(export_name).name == export_name and not export_name.startswith(".")
        if not (bare and export_name.endswith(".safetensors")):
            raise ConfigurationError(
                f"export_name must be a file name ending in .safetensors (it is written into the run folder), "
                f"got {export_name!r}."
            )
        self.save_hyperparameters()
        size = check_image_size(image_size) if image_size is not None else None
        self.classifier = Classifier(arch, num_classes, tuple(mean), tuple(std), size, feature_node)
        #: NHWC layout: ``channels_last`` if given, else the Trainer's, decided in `setup`
        self.channels_last = False
        self.val_metrics = BackdoorMetrics(num_classes, "val")
        self.test_metrics = BackdoorMetrics(num_classes, "test")
        self.attack_config: dict[str, Any] | None = None
        self.data_config: dict[str, Any] | None = None

    def forward(self, images: Tensor) -> Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.classifier(images)

    def answering_classifier(self) -> Classifier:
        """The classifier being trained (feature views read its penultimate features)."""
        return self.classifier

    def setup(self, stage: str) -> None:
        given = self.hparams.channels_last
        self.channels_last = uses_channels_last(self.trainer) if given is None else given
        if self.channels_last:
            self.classifier.to(memory_format=torch.channels_last)
        datamodule = self.trainer.datamodule
        if datamodule is None:
            return
        check_class_count(
            datamodule, self.hparams.num_classes, "the model", "Set model.init_args.num_classes: {declared}."
        )
        served, built = served_image_size(datamodule), self.classifier.image_size
        if built is not None and served is not None and tuple(served) != tuple(built):
            raise ConfigurationError(
                f"model.init_args.image_size is {list(built)} but the data's images are {list(served)}: "
                f"set model.init_args.image_size: {list(served)}."
            )
        attack = getattr(datamodule, "attack", None)
        self.attack_config = attack.config() if attack is not None else None
        if hasattr(datamodule, "data_config"):
            self.data_config = datamodule.data_config()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels, true_labels = split_batch(batch)
        self.val_metrics.update(self, self(images), labels, dataloader_idx, true_labels)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels, true_labels = split_batch(batch)
        self.test_metrics.update(self, self(images), labels, dataloader_idx, true_labels)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(batch[0]).argmax(dim=1)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return sgd_multistep(self.parameters(), hp.lr, hp.momentum, hp.weight_decay, hp.lr_milestones, hp.lr_gamma)

    def victim_metadata(self) -> VictimMetadata:
        hp = self.hparams
        return VictimMetadata(
            hp.arch,
            hp.num_classes,
            list(hp.mean),
            list(hp.std),
            self.attack_config,
            self.data_config,
            feature_node=hp.get("feature_node"),
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["victim_metadata"] = asdict(self.victim_metadata())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get("victim_metadata") or {}
        self.attack_config = stored.get("attack", self.attack_config)
        self.data_config = stored.get("data", self.data_config)

    def export_victim(self, path: str | Path) -> Path:
        """Write the classifier as a frozen-victim file (weights and metadata only)."""
        return save_victim(path, self.classifier, self.victim_metadata())

    def on_train_end(self) -> None:
        folder = run_folder(self.trainer)  # on every rank: it is a collective under DDP
        if not self.trainer.is_global_zero:
            return
        path = self.export_victim(folder / self.hparams.export_name)
        metrics = self.trainer.callback_metrics
        summary = ", ".join(
            f"{LABELS[name]} {float(metrics[f'val/{name}']):.2%}" for name in REPORTED if f"val/{name}" in metrics
        )
        rank_zero_info(f"Victim written to {path}" + (f" ({summary} on the last validation)" if summary else ""))


class VictimTrainer(VictimTask):
    """The earlier name of :class:`VictimTask` (configs naming it keep working for one release)."""

    def __init__(self, **kwargs: Any) -> None:
        warn_renamed("VictimTrainer", "VictimTask")
        super().__init__(**kwargs)
