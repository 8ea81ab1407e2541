"""Neural Cleanse: trigger reverse-engineering for every class, MAD outlier detection and
unlearning (:mod:`.torch_model`), and its LightningModule (:mod:`.lightning_model`)."""

from typing import TYPE_CHECKING

from lightning_defense.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_defense.defenses.neural_cleanse.lightning_model import NeuralCleanse
    from lightning_defense.defenses.neural_cleanse.torch_model import (
        NeuralCleanseModel,
        ReversedTriggers,
        anomaly_indices,
        flagged_target,
        most_anomalous,
    )

__all__ = [
    "NeuralCleanse",
    "NeuralCleanseModel",
    "ReversedTriggers",
    "anomaly_indices",
    "flagged_target",
    "most_anomalous",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
