"""BA, ASR, RA and the relabel-proof ASR, computed once for every module (contract 4).

Evaluation loaders come in a fixed order: index 0 is the clean test set, index 1 the attack's
poisoned test set (the images whose true class is not the target, with the trigger), labelled
with the attacker's labels; its batches also carry the images' true classes.

- **BA** (benign accuracy): clean test images put in their class.
- **ASR** (attack success rate): poisoned images that land on the attacker's label.
- **RA** (robust accuracy, BackdoorBench's R-Acc): poisoned images put in their true class.
- **ASR-any** (``asr_any``, relabel-proof ASR): the largest share of poisoned images that land in
  one class c other than their own, over all classes c. A backdoor moved to another class by a
  label map (REFINE's permutation sends the target t to M(t)) still counts, where ASR would read
  0. A removed backdoor leaves the clean error rate spread over the classes: asr_any is then about
  (1 - RA) / (classes - 1) when errors spread evenly, and at most 1 - RA.

A defense "removes" a backdoor only where RA is close to BA and asr_any is low. Defenses with an
output map (REFINE, T-MR) also log the victim's answer behind the map on transformed poisoned
images (``inner_asr``, ``inner_asr_any``): does the trigger still fire through the input transform?

All are torchmetrics metrics with summed states, so they sync across DDP processes.
"""

from __future__ import annotations

import torch
from lightning import LightningModule
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from lightning_defense.errors import ConfigurationError

#: what every table reports, in this order, and the name each is shown under
REPORTED = ("ba", "asr", "ra", "asr_any")
LABELS = {"ba": "BA", "asr": "ASR", "ra": "RA", "asr_any": "ASR-any"}
METRIC_BY_LOADER = ("ba", "asr")
ROBUST_ACCURACY = "ra"  # of loader 1, against the true labels
ANY_CLASS_ASR = "asr_any"  # of loader 1, against the true labels


class AnyClassAttackSuccess(Metric):
    """max over classes c of #(prediction = c ≠ true class) / #images: the attack success rate of
    a backdoor whatever class it sends the poisoned images to (see the module docstring)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("wrong_into", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, true_labels: Tensor) -> None:
        predictions = logits.argmax(dim=1) if logits.ndim == 2 else logits
        wrong = predictions != true_labels
        self.wrong_into += torch.bincount(predictions[wrong], minlength=self.num_classes)[: self.num_classes]
        self.total += true_labels.numel()

    def compute(self) -> Tensor:
        return self.wrong_into.max().float() / self.total.clamp(min=1)


class BackdoorMetrics(nn.Module):
    """BA, ASR, RA and ASR-any for one stage (``val`` or ``test``) and one model (``prefix``)."""

    def __init__(self, num_classes: int, stage: str, prefix: str = "") -> None:
        super().__init__()
        self.stage, self.prefix = stage, prefix
        accuracies = {
            name: MulticlassAccuracy(num_classes, average="micro") for name in (*METRIC_BY_LOADER, ROBUST_ACCURACY)
        }
        self.metrics = nn.ModuleDict({**accuracies, ANY_CLASS_ASR: AnyClassAttackSuccess(num_classes)})

    def key(self, metric: str) -> str:
        """The logged name of ``metric`` (``ba``, ``asr``, ``ra``, ``asr_any``), e.g. ``val/victim_ra``."""
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
        """Update BA (loader 0) or ASR (loader 1, and RA and ASR-any when the true labels are given)
        and log them for the epoch."""
        if dataloader_idx >= len(METRIC_BY_LOADER):
            raise ConfigurationError(
                f"Evaluation loader {dataloader_idx} is neither the clean (0) nor the poisoned (1) set."
            )
        logits = logits.float()
        self._log(module, METRIC_BY_LOADER[dataloader_idx], logits, labels, prog_bar=True)
        if dataloader_idx == 1 and true_labels is not None:
            self._log(module, ROBUST_ACCURACY, logits, true_labels, prog_bar=False)
            self._log(module, ANY_CLASS_ASR, logits, true_labels, prog_bar=False)

    def update_poisoned(self, module: LightningModule, logits: Tensor, labels: Tensor, true_labels: Tensor) -> None:
        """ASR and ASR-any alone, for a model's answers on the poisoned set only (``inner_``: the
        victim behind an output map, whose BA and RA mean nothing)."""
        logits = logits.float()
        self._log(module, "asr", logits, labels, prog_bar=False)
        self._log(module, ANY_CLASS_ASR, logits, true_labels, prog_bar=False)

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
