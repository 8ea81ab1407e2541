"""What BTI-DBF's evaluation measures beside BA, ASR and RA, in torchmetrics (DDP-correct): how
well disagreement between the defended model and the victim flags poisoned inputs, and how close
the inverted trigger G(x) comes to the real one in the victim's features."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import BinaryF1Score, BinaryPrecision, BinaryRecall

if TYPE_CHECKING:
    from lightning_defense.attacks import Attack
    from lightning_defense.victims.classifier import Classifier


class InversionMetrics(nn.Module):
    """The metrics of one stage (``val`` or ``test``), logged as ``<stage>/detection_{precision,
    recall,f1}`` and ``<stage>/{generated_feature_distance, trigger_feature_distance,
    generated_trigger_cosine}``."""

    def __init__(self, stage: str) -> None:
        super().__init__()
        self.stage = stage
        self.detection = MetricCollection(
            {"precision": BinaryPrecision(), "recall": BinaryRecall(), "f1": BinaryF1Score()},
            prefix=f"{stage}/detection_",
        )
        self.generated_distance = MeanMetric()
        self.trigger_distance = MeanMetric()
        self.trigger_cosine = MeanMetric()

    def update_detection(self, defended_logits: Tensor, victim_logits: Tensor, poisoned: bool) -> None:
        """An input is flagged where the defended model and the victim disagree; it is positive
        where it comes from the poisoned set."""
        flagged = defended_logits.argmax(dim=1) != victim_logits.argmax(dim=1)
        self.detection.update(flagged, torch.full_like(flagged, poisoned))

    @torch.no_grad()
    def update_trigger(
        self, victim: Classifier, generator: nn.Module, attack: Attack, images: Tensor, labels: Tensor
    ) -> None:
        """On clean ``images``: the victim's features of G(x) against those of the real poisoned
        images (mean squared distance; the clean-to-poisoned distance for scale) and the cosine
        between the two feature shifts (1: G moves the features as the trigger does)."""
        images = images[attack.poisoned_test_images(labels)]
        if len(images) == 0:
            return
        poisoned = victim.features(attack.apply(images.float())).float().flatten(1)
        generated = victim.features(generator(images)).float().flatten(1)
        clean = victim.features(images).float().flatten(1)
        self.generated_distance.update((generated - poisoned).pow(2).mean(dim=1))
        self.trigger_distance.update((clean - poisoned).pow(2).mean(dim=1))
        self.trigger_cosine.update(F.cosine_similarity(generated - clean, poisoned - clean, dim=1))

    def compute_and_reset(self, with_trigger: bool) -> dict[str, Tensor]:
        """The values to log; the trigger metrics only ``with_trigger`` (the data has an attack).
        Under DDP every rank must call this: ``compute`` is a collective, updated or not."""
        values = dict(self.detection.compute())
        self.detection.reset()
        names = {
            "generated_distance": "generated_feature_distance",
            "trigger_distance": "trigger_feature_distance",
            "trigger_cosine": "generated_trigger_cosine",
        }
        for attribute, key in names.items():
            metric = getattr(self, attribute)
            if with_trigger:
                values[f"{self.stage}/{key}"] = metric.compute()
            metric.reset()
        return values
