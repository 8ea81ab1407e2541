"""REFINE: input transformation + label permutation around a frozen victim."""

from lightning_defense.defenses.refine.torch_model import (
    LabelPermutation,
    Refine,
    TransformNet,
    derangement,
    supervised_contrastive_loss,
)

__all__ = ["LabelPermutation", "Refine", "TransformNet", "derangement", "supervised_contrastive_loss"]
