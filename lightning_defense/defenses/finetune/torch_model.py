"""Fine-tuning baselines: repair a copy of the victim with the defender's labelled data.

FT fine-tunes every weight of the copy with cross-entropy. FST (feature shift tuning, Min et
al., NeurIPS 2023) first re-initialises the copy's linear head and adds a penalty on the inner
product between the new head and the original one, keeping the head at the original's norm: the
head has to move away from the backdoored head, which shifts the features and, with them, the
backdoor's, where plain FT on a few clean images tends to keep both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_defense.victims import Classifier


class FineTuning(nn.Module):
    """FT: a trainable copy of the frozen victim, trained with cross-entropy; the defended model
    is the copy."""

    def __init__(self, victim: Classifier) -> None:
        super().__init__()
        self.victim = victim.freeze()
        self.repaired = victim.trainable_copy()

    def forward(self, images: Tensor) -> Tensor:
        return self.repaired(images)

    def loss(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        ce = F.cross_entropy(self.repaired(images).float(), labels)
        return {"loss": ce, "ce": ce}

    def after_step(self) -> None:
        """Called after every optimizer step."""


class FeatureShiftTuning(FineTuning):
    """FST: FT with a re-initialised linear head that is pushed away from the original head.

    Loss: CE + ``shift_weight`` * <w, w_original>, w the head's weight; after each step w is
    rescaled to the original head's norm (the official code's projection).

    Args:
        shift_weight: alpha of the inner-product penalty (official CIFAR-10 default: 0.2).
    """

    def __init__(self, victim: Classifier, shift_weight: float = 0.2) -> None:
        super().__init__(victim)
        head = self.repaired.linear_layer
        self.register_buffer("original_head", head.weight.detach().clone())
        self.register_buffer("head_norm", head.weight.detach().norm())
        self.shift_weight = shift_weight
        bound = 1 / math.sqrt(head.in_features)  # nn.Linear's own initialisation range
        with torch.no_grad():
            head.weight.uniform_(-bound, bound)
            head.bias.uniform_(-bound, bound)
            self.after_step()

    def loss(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        parts = super().loss(images, labels)
        overlap = (self.repaired.linear_layer.weight.float() * self.original_head).sum()
        return {"loss": parts["ce"] + self.shift_weight * overlap, "ce": parts["ce"], "head_overlap": overlap}

    @torch.no_grad()
    def after_step(self) -> None:
        weight = self.repaired.linear_layer.weight
        weight.mul_(self.head_norm / weight.norm())
