"""REFINE's adaptive attack (Chen et al., ICLR 2025, §5.4, eq. 10) in plain torch: a victim trained
to keep its backdoor through a REFINE of the attacker's own.

The attacker knows the defense but not the defender's T or M. It draws its own T_a (a randomly
initialised transformation network, fixed) and M_a (a seeded derangement) and trains the
victim F on the poisoned data with

    L_adap = L_b + γ · L_refine,
    L_b      = CE(F(x), y),
    L_refine = CE(M_a(F(T_a(x))), y),

both on the same poisoned batch (x, y): clean images with their labels, poisoned images with the
attacker's. L_refine asks the model REFINE would build from F (M_a ∘ F ∘ T_a) to classify clean
images and to keep the backdoor, so F learns to answer through a transformation it did not see
and through a relabelling of its outputs. Gradients reach F only: T_a and M_a are fixed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_defense.defenses.components import LabelPermutation
from lightning_defense.errors import ConfigurationError


class RefineSimulation(nn.Module):
    """The attacker's REFINE: a fixed T_a and M_a, and the adaptive loss of a classifier.

    Args:
        transform_net: T_a, kept at its initialization (the caller seeds it); frozen here.
        num_classes: the classifier's class count (M_a's size).
        permutation_seed: draws M_a. The defender's REFINE draws its M from its own
            ``permutation_seed``; an attacker who guessed it would be a stronger attacker than
            the paper's.
        gamma: γ, the weight of L_refine (γ = 0 is plain backdoor training).
    """

    def __init__(self, transform_net: nn.Module, num_classes: int, permutation_seed: int, gamma: float) -> None:
        super().__init__()
        if not gamma >= 0:
            raise ConfigurationError(f"gamma must be >= 0 (0 is plain backdoor training), got {gamma}.")
        self.transform_net = transform_net.requires_grad_(False).eval()
        self.label_permutation = LabelPermutation(num_classes, permutation_seed)
        self.gamma = gamma

    def train(self, mode: bool = True) -> RefineSimulation:
        super().train(mode)
        self.transform_net.eval()  # T_a is fixed: its BatchNorm statistics stay those it was drawn with
        return self

    @torch.no_grad()
    def transform(self, images: Tensor) -> Tensor:
        """T_a(x); no gradient flows back (nothing before T_a learns)."""
        return self.transform_net(images)

    def loss(self, classifier: nn.Module, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """L_adap and its parts on a (poisoned) batch."""
        backdoor = F.cross_entropy(classifier(images), labels)
        if self.gamma == 0:
            return {"loss": backdoor, "backdoor": backdoor}
        refine = F.cross_entropy(self.label_permutation(classifier(self.transform(images))).float(), labels)
        return {"loss": backdoor + self.gamma * refine, "backdoor": backdoor, "refine": refine}
