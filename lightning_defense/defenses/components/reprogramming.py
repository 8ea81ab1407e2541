"""The defended model of the defenses that reprogram a frozen victim F: M(F(T(x))), an input
transformation T before it and a label map M after it (REFINE, T-MR, BTI-DBF (P)'s purifier with
M = identity)."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_defense.defenses.components.label_permutation import LabelPermutation
from lightning_defense.victims.classifier import Classifier


class ReprogrammedClassifier(nn.Module):
    """M(F(T(x))) around the frozen victim F (its weights never change).

    Args:
        victim: F, taking [0, 1] pixels; frozen here.
        transform_net: T, images to images of the same size, in [0, 1].
        label_permutation: M.
    """

    def __init__(self, victim: Classifier, transform_net: nn.Module, label_permutation: LabelPermutation) -> None:
        super().__init__()
        self.victim = victim.freeze()
        self.transform_net = transform_net
        self.label_permutation = label_permutation

    def behind_map(self, images: Tensor) -> Tensor:
        """F(T(x)): the victim's logits on the transformed images, before the label map M."""
        return self.victim(self.transform_net(images))

    def forward(self, images: Tensor) -> Tensor:
        return self.label_permutation(self.behind_map(images))
