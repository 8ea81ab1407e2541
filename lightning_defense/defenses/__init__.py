"""Defenses: each wraps a frozen victim classifier."""

from lightning_defense.defenses.base import DefenseModule
from lightning_defense.defenses.bdmae import BDMAE, MAETrainer
from lightning_defense.defenses.btidbf import BTIDBFPurification, BTIDBFUnlearning
from lightning_defense.defenses.finetune import FeatureShiftTune, FineTune
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
    "MAETrainer",
    "ShrinkPad",
    "TMR",
]
