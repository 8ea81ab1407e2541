"""REFINE: input transformation + label permutation around a frozen victim."""

from lightning_defense.defenses.refine.lightning_model import REFINE
from lightning_defense.defenses.refine.torch_model import (
    LabelPermutation,
    Refine,
    TransformNet,
    derangement,
    supervised_contrastive_loss,
)

__all__ = ["REFINE", "LabelPermutation", "Refine", "TransformNet", "derangement", "supervised_contrastive_loss"]
