"""lightning-defense: defending image classifiers against backdoors, on PyTorch Lightning."""

from typing import TYPE_CHECKING

from lightning_defense.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_defense import attacks, callbacks, data, defenses, victims
    from lightning_defense.callbacks import EpochSummary, PredictionWriter
    from lightning_defense.defenses import REFINE
    from lightning_defense.trainer import DefenseTrainer
    from lightning_defense.victims.input_aware_trainer import InputAwareVictimTask
    from lightning_defense.victims.input_aware_trainer import InputAwareVictimTrainer as InputAwareVictimTrainer
    from lightning_defense.victims.lightning_model import VictimTask
    from lightning_defense.victims.lightning_model import VictimTrainer as VictimTrainer  # earlier names

__version__ = "0.1.0"
__all__ = [
    "REFINE",
    "DefenseTrainer",
    "EpochSummary",
    "InputAwareVictimTask",
    "PredictionWriter",
    "VictimTask",
    "callbacks",
    "attacks",
    "data",
    "defenses",
    "victims",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
