"""BA and ASR, computed once for every module (contract 4).

Evaluation loaders come in a fixed order: index 0 is the clean test set (benign accuracy, BA),
index 1 the attack's poisoned test set, labelled with the attacker's labels (attack success rate,
ASR: the share of poisoned images that land on the attacker's label). Both are micro-averaged
accuracies from torchmetrics, so they sync across DDP processes.
"""

from __future__ import annotations

from lightning import LightningModule
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_defense.errors import ConfigurationError

METRIC_BY_LOADER = ("ba", "asr")


class BackdoorMetrics(nn.Module):
    """BA and ASR metrics for one stage (``val`` or ``test``) and one model (``prefix``)."""

    def __init__(self, num_classes: int, stage: str, prefix: str = "") -> None:
        super().__init__()
        self.stage, self.prefix = stage, prefix
        self.metrics = nn.ModuleDict(
            {name: MulticlassAccuracy(num_classes, average="micro") for name in METRIC_BY_LOADER}
        )

    def name(self, dataloader_idx: int) -> str:
        return f"{self.stage}/{self.prefix}{METRIC_BY_LOADER[dataloader_idx]}"

    def update(self, module: LightningModule, logits: Tensor, labels: Tensor, dataloader_idx: int) -> None:
        """Update BA (loader 0) or ASR (loader 1) and log it for the epoch."""
        if dataloader_idx >= len(METRIC_BY_LOADER):
            raise ConfigurationError(
                f"Evaluation loader {dataloader_idx} is neither the clean (0) nor the poisoned (1) set."
            )
        metric = self.metrics[METRIC_BY_LOADER[dataloader_idx]]
        metric.update(logits.float(), labels)
        module.log(
            self.name(dataloader_idx), metric, on_step=False, on_epoch=True, prog_bar=True, add_dataloader_idx=False
        )
