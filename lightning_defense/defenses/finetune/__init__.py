"""Fine-tuning baselines: FT and FST (feature shift tuning)."""

from lightning_defense.defenses.finetune.lightning_model import FeatureShiftTune, FineTune
from lightning_defense.defenses.finetune.torch_model import FeatureShiftTuning, FineTuning

__all__ = ["FeatureShiftTune", "FeatureShiftTuning", "FineTune", "FineTuning"]
