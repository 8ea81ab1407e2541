"""lightning-defense: defending image classifiers against backdoors, on PyTorch Lightning."""

from typing import TYPE_CHECKING

from lightning_defense.deprecation import keep_moved_modules
from lightning_defense.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_defense import attacks, data, defenses, io, study, training, victims
    from lightning_defense.attacks.input_aware.lightning_model import InputAwareVictimTask
    from lightning_defense.attacks.input_aware.lightning_model import InputAwareVictimTrainer as InputAwareVictimTrainer
    from lightning_defense.defenses import REFINE
    from lightning_defense.training.callbacks import EpochSummary, PredictionWriter
    from lightning_defense.training.trainer import DefenseTrainer
    from lightning_defense.training.victim_task import VictimTask
    from lightning_defense.training.victim_task import VictimTrainer as VictimTrainer  # earlier names

__version__ = "0.1.0"
__all__ = [
    "REFINE",
    "DefenseTrainer",
    "EpochSummary",
    "InputAwareVictimTask",
    "PredictionWriter",
    "VictimTask",
    "attacks",
    "data",
    "defenses",
    "io",
    "study",
    "training",
    "victims",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__)

# the modules' homes before the package root was tidied into training/, io/, study/ and metrics,
# and before IAD's trainer joined its attack
keep_moved_modules(
    {
        "lightning_defense.callbacks": "lightning_defense.training.callbacks",
        "lightning_defense.checkpoint_io": "lightning_defense.io.torch_files",
        "lightning_defense.evaluation": "lightning_defense.metrics",
        "lightning_defense.hardware": "lightning_defense.training.hardware",
        "lightning_defense.optim": "lightning_defense.training.optim",
        "lightning_defense.run_folder": "lightning_defense.io.run_folder",
        "lightning_defense.safetensors_io": "lightning_defense.io.safetensors_files",
        "lightning_defense.shipped": "lightning_defense.io.shipped",
        "lightning_defense.trainer": "lightning_defense.training.trainer",
        "lightning_defense.victims.input_aware_trainer": "lightning_defense.attacks.input_aware.lightning_model",
        "lightning_defense.victims.lightning_model": "lightning_defense.training.victim_task",
    }
)
