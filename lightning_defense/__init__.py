"""lightning-defense: defending image classifiers against backdoors, on PyTorch Lightning."""

from lightning_defense import attacks, data, defenses, victims
from lightning_defense.defenses import REFINE
from lightning_defense.victims.lightning_model import VictimTrainer

__version__ = "0.1.0"
__all__ = ["REFINE", "VictimTrainer", "attacks", "data", "defenses", "victims"]
