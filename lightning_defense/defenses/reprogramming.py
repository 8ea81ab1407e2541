"""The training step of the defenses that reprogram a frozen victim with REFINE's loss: an input
transformation T learns so that M(F(T(x))) answers as F does on clean x (REFINE, T-MR). A
subclass says which T; the loss is :class:`~lightning_defense.defenses.refine.torch_model.RefineModel`'s."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_defense.data.augmentation import BatchAugmentation
from lightning_defense.defenses.base import DefenseModule
from lightning_defense.defenses.components import LabelPermutation, save_defended
from lightning_defense.defenses.refine.torch_model import ClassificationLoss, RefineModel
from lightning_defense.errors import ConfigurationError
from lightning_defense.io.run_folder import run_folder
from lightning_defense.training.callbacks import FigureRow
from lightning_defense.training.optim import sgd_multistep
from lightning_defense.victims import load_victim


class ReprogrammingDefense(DefenseModule, ABC):
    """M(F(T(x))) trained with REFINE's loss; subclasses build T (:meth:`build_transform_net`) and
    say what rebuilds it from an export (:meth:`transform_config`).

    The auxiliary data's labels are never used: the victim's predictions are the targets. The
    arguments are :class:`~lightning_defense.defenses.REFINE`'s (its docstring explains each).
    """

    model: RefineModel

    def __init__(
        self,
        victim: str,
        use_permutation: bool = True,
        permutation_seed: int = 0,
        classification_loss: ClassificationLoss = "ce",
        contrastive_weight: float = 0.1,
        temperature: float = 0.07,
        soft_label_temperature: float = 4.0,
        encoder_head_weight: float = 0.0,
        labelled_augmentations: Sequence[nn.Module] = (),
        augment: bool = True,
        corruptions: Sequence[nn.Module] = (),
        consistency_weight: float = 0.0,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_milestones: Sequence[int] = (100, 130),
        lr_gamma: float = 0.8,
    ) -> None:
        victim_model = load_victim(victim)
        super().__init__(victim_model.num_classes)
        # every __init__ of the chain, the subclass's included; modules are not hyperparameters (a
        # checkpoint's are read weights-only): the run's config records them
        self.save_hyperparameters(ignore=["labelled_augmentations", "corruptions"])
        self.model = RefineModel(
            victim_model,
            self.build_transform_net(victim_model.num_classes),
            LabelPermutation(victim_model.num_classes, permutation_seed, enabled=use_permutation),
            classification_loss=classification_loss,
            contrastive_weight=contrastive_weight,
            temperature=temperature,
            soft_label_temperature=soft_label_temperature,
            encoder_head_weight=encoder_head_weight,
            labelled_augmentations=labelled_augmentations,
            augmentation=BatchAugmentation() if augment else None,
            corruptions=corruptions,
            consistency_weight=consistency_weight,
        )

    @abstractmethod
    def build_transform_net(self, num_classes: int) -> nn.Module:
        """T, from the hyperparameters."""

    @abstractmethod
    def transform_config(self) -> dict[str, Any]:
        """What rebuilds T from an export (the keyword arguments of T's class)."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams.augment and getattr(self.trainer.datamodule, "augmentation", None) is not None:
            raise ConfigurationError(
                f"{type(self).__name__} augments T's inputs itself, after the victim labelled the images as they "
                "are; an augmenting data module would hand it augmented images to label (an augmentation can fire "
                "a backdoor). Remove data.init_args.augmentation (or, to label augmented images on purpose, "
                "model.init_args.augment: false)."
            )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, _ = batch  # auxiliary labels are never used
        losses = self.model.loss(images, gather=self.gather_batch)
        self.log_dict({f"train/{name}": value for name, value in losses.items()}, prog_bar=True)
        return losses["loss"]

    def gather_batch(self, tensor: Tensor) -> Tensor:
        """``tensor`` of every process, concatenated along the batch (with gradients); itself on one."""
        if getattr(self._trainer, "world_size", 1) == 1:
            return tensor
        return self.all_gather(tensor, sync_grads=True).flatten(0, 1)

    def figure_rows(self, name: str, images: Tensor) -> list[FigureRow]:
        """For :class:`~lightning_defense.training.callbacks.TransformGrid`: the images with the victim's
        predictions, and T(images) with the defended model's."""
        transformed = self.model.transform_net(images).float()
        victim, defended = self.victim(images).argmax(1), self(images).argmax(1)
        return [
            (name, images, [f"F: {int(p)}" for p in victim]),
            (f"T({name})", transformed, [f"M∘F∘T: {int(p)}" for p in defended]),
        ]

    def export(self, path: str | Path) -> Path:
        """Write T and M (and a reference to the victim) for
        :func:`~lightning_defense.defenses.components.load_defended`."""
        return save_defended(path, self.model, self.hparams.victim, self.transform_config())

    def on_train_end(self) -> None:
        folder = run_folder(self.trainer)  # on every rank: it is a collective under DDP
        if self.trainer.is_global_zero:
            path = self.export(folder / "defended.safetensors")
            rank_zero_info(f"Defended model written to {path}")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        return sgd_multistep(
            self.model.transform_net.parameters(), hp.lr, hp.momentum, hp.weight_decay, hp.lr_milestones, hp.lr_gamma
        )
