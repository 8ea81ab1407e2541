"""Parts that several defenses share, in plain torch: the input transformations, the label
permutation M, the reprogrammed classifier M(F(T(x))) and its export."""

from lightning_defense.defenses.components.deploy import (
    export_program,
    fold_for_inference,
    load_defended,
    save_defended,
)
from lightning_defense.defenses.components.label_permutation import LabelPermutation, derangement
from lightning_defense.defenses.components.reprogramming import ReprogrammedClassifier
from lightning_defense.defenses.components.transform_net import BorderPerturbation, OutputActivation, TransformNet

__all__ = [
    "BorderPerturbation",
    "LabelPermutation",
    "OutputActivation",
    "ReprogrammedClassifier",
    "TransformNet",
    "derangement",
    "export_program",
    "fold_for_inference",
    "load_defended",
    "save_defended",
]
