"""Callbacks shared by every module."""

from __future__ import annotations

import time

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


class EpochSummary(Callback):
    """One line per validation with every logged metric and the elapsed time, for runs whose
    output goes to a file, where a live progress bar shows nothing until the end."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = time.monotonic()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = ", ".join(f"{k} {float(v):.4f}" for k, v in sorted(trainer.callback_metrics.items()))
        elapsed = time.monotonic() - getattr(self, "start", time.monotonic())
        rank_zero_info(f"epoch {trainer.current_epoch}/{trainer.max_epochs - 1} [{elapsed / 60:.1f} min]: {metrics}")
