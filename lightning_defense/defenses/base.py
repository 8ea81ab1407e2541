"""What every defense shares: a frozen victim, and BA/ASR of the defended model beside the victim's."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_defense.errors import ConfigurationError, check_class_count
from lightning_defense.metrics import LABELS, REPORTED, BackdoorMetrics, split_batch
from lightning_defense.training.hardware import uses_channels_last
from lightning_defense.victims import Classifier
from lightning_defense.victims.victim_file import check_same_victim

# The frozen victim stays in eval mode on purpose (contract 2); Lightning's warning about
# modules in eval mode at the start of fit would only alarm users.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


class DefenseModule(LightningModule):
    """Base of the defenses' LightningModules.

    Subclasses build :attr:`model`, the defended model in plain torch, around a victim from
    :func:`~lightning_defense.victims.load_victim` that it keeps as ``model.victim``; ``forward``
    is the defended model (subclasses override these two where theirs differ). Validation and test log
    ``{val,test}/ba``, ``/asr``, ``/ra`` and ``/asr_any`` for the defended model and the same with
    ``victim_`` for the undefended victim on the same batches; a model with an output map
    (``model.behind_map(images)``: the victim's logits before the map) also logs ``inner_asr`` and
    ``inner_asr_any`` (:mod:`lightning_defense.metrics` defines them all).
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.val_metrics = BackdoorMetrics(num_classes, "val")
        self.test_metrics = BackdoorMetrics(num_classes, "test")
        self.val_victim_metrics = BackdoorMetrics(num_classes, "val", prefix="victim_")
        self.test_victim_metrics = BackdoorMetrics(num_classes, "test", prefix="victim_")
        # the victim behind an output map (models with ``behind_map``: REFINE, T-MR), poisoned set only
        self.val_inner_metrics = BackdoorMetrics(num_classes, "val", prefix="inner_")
        self.test_inner_metrics = BackdoorMetrics(num_classes, "test", prefix="inner_")

    #: the defended model in plain torch, built by the subclass; it holds the frozen victim as ``victim``
    model: nn.Module

    @property
    def victim(self) -> Classifier:
        """The frozen victim classifier."""
        return self.model.victim

    def forward(self, images: Tensor) -> Tensor:
        """Logits of the defended model for [0, 1] images."""
        return self.model(images)

    def answering_classifier(self) -> Classifier:
        """The classifier that answers last in the defended model: the repaired copy for defenses
        that fine-tune one (``model.repaired``), else the victim behind whatever the defense does to
        its input. Its penultimate features are the defended model's (feature views)."""
        repaired = getattr(self.model, "repaired", None)
        return repaired if isinstance(repaired, Classifier) else self.victim

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        check_class_count(datamodule, self.victim.num_classes, "the victim", "Use the victim's data set.")
        # the poisoned test set comes from the data's victim file: another victim's attack would be measured
        defended, evaluated = self.hparams.get("victim"), getattr(datamodule, "victim", None)
        if defended and evaluated and Path(str(defended)).resolve() != Path(str(evaluated)).resolve():
            raise ConfigurationError(
                f"model.init_args.victim is {str(defended)!r} but data.init_args.victim is {str(evaluated)!r}: the "
                "poisoned test set would come from another victim's attack. Give both the same file (or the data "
                "an `attack` instead of a victim, to evaluate another attack)."
            )
        # NHWC weights make every convolution run NHWC, inputs included: measured faster on CPUs in
        # fp32 and bf16, and on GPUs in 16 bits (tensor cores); PERFORMANCE.md
        if uses_channels_last(self.trainer):
            self.to(memory_format=torch.channels_last)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # every kind of --ckpt_path (last, best, hpc, a path): a checkpoint of another victim is refused
        stored = (checkpoint.get("hyper_parameters") or {}).get("victim")
        check_same_victim(stored, self.hparams.get("victim"), "the checkpoint to resume")

    def _evaluate(self, batch: tuple[Tensor, ...], dataloader_idx: int, stage: str) -> tuple[Tensor, Tensor]:
        """Update BA/ASR/RA of the defended model and of the victim; returns both logits."""
        images, labels, true = split_batch(batch)
        defended, victim = self(images), self.victim(images)
        getattr(self, f"{stage}_metrics").update(self, defended, labels, dataloader_idx, true)
        getattr(self, f"{stage}_victim_metrics").update(self, victim, labels, dataloader_idx, true)
        behind_map = getattr(self.model, "behind_map", None)
        if behind_map is not None and dataloader_idx == 1 and true is not None:
            # does the trigger still fire through the transform, whatever the map then does with it?
            getattr(self, f"{stage}_inner_metrics").update_poisoned(self, behind_map(images), labels, true)
        return defended, victim

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, "val")

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, dataloader_idx, "test")

    def before_after(self, stage: str = "val") -> str | None:
        """``victim BA .. / ASR .. / RA ..  ->  defended BA .. / ASR .. / RA ..`` from the last
        evaluation's metrics (RA where the poisoned set carried true labels)."""
        metrics = self.trainer.callback_metrics

        def line(model: BackdoorMetrics) -> str | None:
            values = {name: metrics.get(model.key(name)) for name in REPORTED}
            if values["ba"] is None or values["asr"] is None:
                return None
            return " / ".join(f"{LABELS[name]} {100 * float(v):.2f}%" for name, v in values.items() if v is not None)

        victim, defended = line(getattr(self, f"{stage}_victim_metrics")), line(getattr(self, f"{stage}_metrics"))
        return f"victim {victim}  ->  defended {defended}" if victim and defended else None

    def on_fit_end(self) -> None:
        summary = self.before_after("val")
        if summary:
            rank_zero_info(f"Last validation: {summary}")

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self(batch[0]).argmax(dim=1)
