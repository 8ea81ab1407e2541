"""BA, ASR and RA, computed once for every module (contract 4).

Evaluation loaders come in a fixed order: index 0 is the clean test set (benign accuracy, BA),
index 1 the attack's poisoned test set, labelled with the attacker's labels (attack success rate,
ASR: the share of poisoned images that land on the attacker's label). Its batches also carry the
images' true classes: robust accuracy, RA (BackdoorBench's R-Acc), is the share of poisoned images
put in their true class. ASR alone cannot tell a removed trigger (RA near BA) from a backdoor that
still fires under another label (REFINE's permutation, see benchmarks/README.md). All three are
micro-averaged accuracies from torchmetrics, so they sync across DDP processes.
"""

from __future__ import annotations

from lightning import LightningModule
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_defense.errors import ConfigurationError

METRIC_BY_LOADER = ("ba", "asr")
ROBUST_ACCURACY = "ra"  # of loader 1, against the true labels


class BackdoorMetrics(nn.Module):
    """BA, ASR and RA metrics for one stage (``val`` or ``test``) and one model (``prefix``)."""

    def __init__(self, num_classes: int, stage: str, prefix: str = "") -> None:
        super().__init__()
        self.stage, self.prefix = stage, prefix
        self.metrics = nn.ModuleDict(
            {name: MulticlassAccuracy(num_classes, average="micro") for name in (*METRIC_BY_LOADER, ROBUST_ACCURACY)}
        )

    def key(self, metric: str) -> str:
        """The logged name of ``metric`` (``ba``, ``asr`` or ``ra``), e.g. ``val/victim_ra``."""
        return f"{self.stage}/{self.prefix}{metric}"

    def name(self, dataloader_idx: int) -> str:
        return self.key(METRIC_BY_LOADER[dataloader_idx])

    def update(
        self,
        module: LightningModule,
        logits: Tensor,
        labels: Tensor,
        dataloader_idx: int,
        true_labels: Tensor | None = None,
    ) -> None:
        """Update BA (loader 0) or ASR (loader 1, and RA when the true labels are given) and log
        them for the epoch."""
        if dataloader_idx >= len(METRIC_BY_LOADER):
            raise ConfigurationError(
                f"Evaluation loader {dataloader_idx} is neither the clean (0) nor the poisoned (1) set."
            )
        logits = logits.float()
        self._log(module, METRIC_BY_LOADER[dataloader_idx], logits, labels, prog_bar=True)
        if dataloader_idx == 1 and true_labels is not None:
            self._log(module, ROBUST_ACCURACY, logits, true_labels, prog_bar=False)

    def _log(self, module: LightningModule, name: str, logits: Tensor, labels: Tensor, prog_bar: bool) -> None:
        metric = self.metrics[name]
        metric.update(logits, labels)
        module.log(
            self.key(name), metric, on_step=False, on_epoch=True, prog_bar=prog_bar,
            add_dataloader_idx=False,
        )  # fmt: skip


def split_batch(batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(images, labels, true labels or None)`` of an evaluation batch: poisoned batches carry
    the images' true classes after the attacker's labels, clean ones do not."""
    images, labels, *true_labels = batch
    return images, labels, (true_labels[0] if true_labels else None)
