"""Fine-tuning baselines: FT and FST (feature shift tuning)."""

from typing import TYPE_CHECKING

from lightning_defense.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_defense.defenses.finetune.lightning_model import FeatureShiftTune, FineTune
    from lightning_defense.defenses.finetune.torch_model import FeatureShiftTuning, FineTuning

__all__ = ["FeatureShiftTune", "FeatureShiftTuning", "FineTune", "FineTuning"]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
