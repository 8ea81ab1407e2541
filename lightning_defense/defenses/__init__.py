"""Defenses: each wraps a frozen victim classifier."""

from typing import TYPE_CHECKING

from lightning_defense.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_defense.defenses.base import DefenseModule
    from lightning_defense.defenses.bdmae import BDMAE, MAETask
    from lightning_defense.defenses.bdmae import MAETrainer as MAETrainer  # its earlier name
    from lightning_defense.defenses.btidbf import BTIDBFPurification, BTIDBFUnlearning
    from lightning_defense.defenses.components import export_program, load_defended
    from lightning_defense.defenses.finetune import FeatureShiftTune, FineTune
    from lightning_defense.defenses.neural_cleanse import NeuralCleanse
    from lightning_defense.defenses.refine import REFINE, BlackBoxREFINE
    from lightning_defense.defenses.shrinkpad import ShrinkPad
    from lightning_defense.defenses.tmr import TMR

__all__ = [
    "BDMAE",
    "REFINE",
    "BTIDBFPurification",
    "BTIDBFUnlearning",
    "BlackBoxREFINE",
    "DefenseModule",
    "FeatureShiftTune",
    "FineTune",
    "MAETask",
    "NeuralCleanse",
    "ShrinkPad",
    "TMR",
    "export_program",
    "load_defended",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
