"""REFINE: input transformation + label permutation around a frozen victim."""

from lightning_defense.callbacks import TransformGrid  # its home before BTI-DBF drew figures too
from lightning_defense.defenses.refine.deploy import export_program, load_defended, save_defended
from lightning_defense.defenses.refine.lightning_model import REFINE, BlackBoxREFINE
from lightning_defense.defenses.refine.torch_model import (
    LabelPermutation,
    Refine,
    TransformNet,
    derangement,
    supervised_contrastive_loss,
    surrogate_loss,
)

__all__ = [
    "REFINE",
    "BlackBoxREFINE",
    "TransformGrid",
    "export_program",
    "load_defended",
    "save_defended",
    "LabelPermutation",
    "Refine",
    "TransformNet",
    "derangement",
    "surrogate_loss",
    "supervised_contrastive_loss",
]
