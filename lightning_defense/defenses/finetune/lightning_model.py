"""The fine-tuning baselines' training step; the algorithms are in :mod:`.torch_model`."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_defense.defenses.base import DefenseModule
from lightning_defense.defenses.finetune.torch_model import FeatureShiftTuning, FineTuning
from lightning_defense.io.run_folder import run_folder
from lightning_defense.victims import Classifier, load_victim, save_repaired_victim


class FineTune(DefenseModule):
    """FT: fine-tune a copy of the victim on the auxiliary data's labels (true labels, or the
    victim's pseudo-labels for unlabeled kinds); the victim itself stays frozen. The repaired copy
    is written to the run folder as ``repaired_victim.safetensors``, a victim file usable wherever
    a victim is.

    Defaults are the seeds' recipe: SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine decay
    over the run's epochs (a config's ``optimizer``/``lr_scheduler`` replace it).

    Args:
        victim: path of the victim file.
    """

    model: FineTuning

    def __init__(self, victim: str, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
        victim_model = load_victim(victim)
        super().__init__(victim_model.num_classes)
        self.save_hyperparameters()
        self.model = self.build(victim_model)

    def build(self, victim: Classifier) -> FineTuning:
        return FineTuning(victim)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        losses = self.model.loss(images, labels)
        self.log_dict({f"train/{name}": value for name, value in losses.items()}, prog_bar=True)
        return losses["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.model.after_step()

    def on_train_end(self) -> None:
        folder = run_folder(self.trainer)  # on every rank: it is a collective under DDP
        if self.trainer.is_global_zero:
            path = save_repaired_victim(
                folder / "repaired_victim.safetensors", self.model.repaired, self.hparams.victim, type(self).__name__
            )
            rank_zero_info(f"Repaired victim written to {path}")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.model.repaired.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
        epochs = max(1, self.trainer.max_epochs or 1)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)}


class FeatureShiftTune(FineTune):
    """FST (feature shift tuning): FT with a re-initialised head pushed away from the original
    one (see :class:`.torch_model.FeatureShiftTuning`).

    Args:
        shift_weight: alpha (official CIFAR-10 default 0.2).
    """

    model: FeatureShiftTuning

    def __init__(self, victim: str, shift_weight: float = 0.2, **kwargs: Any) -> None:
        self.shift_weight = shift_weight
        super().__init__(victim, **kwargs)
        self.save_hyperparameters()

    def build(self, victim: Classifier) -> FeatureShiftTuning:
        return FeatureShiftTuning(victim, self.shift_weight)
