"""What the ``lightning`` command trains with: its Trainer and checkpoint writer, the callbacks,
the optimizer recipes, and the rules that pick precision, memory layout and threads from the
machine."""

from typing import TYPE_CHECKING

from lightning_defense.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_defense.training.callbacks import (
        EpochMetricsFile,
        EpochSummary,
        FeatureView,
        PredictionWriter,
        RandomStateCheckpoint,
        StopOnNonFiniteLoss,
        TransformGrid,
    )
    from lightning_defense.training.optim import sgd_multistep
    from lightning_defense.training.trainer import AtomicCheckpointIO, DefenseTrainer

__all__ = [
    "AtomicCheckpointIO",
    "DefenseTrainer",
    "EpochMetricsFile",
    "EpochSummary",
    "FeatureView",
    "PredictionWriter",
    "RandomStateCheckpoint",
    "StopOnNonFiniteLoss",
    "TransformGrid",
    "sgd_multistep",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
