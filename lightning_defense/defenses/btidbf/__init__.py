"""BTI-DBF: backdoor trigger inversion by decoupling benign features, then purification or unlearning."""

from typing import TYPE_CHECKING

from lightning_defense.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_defense.defenses.btidbf.lightning_model import BTIDBF, BTIDBFPurification, BTIDBFUnlearning
    from lightning_defense.defenses.btidbf.schedule import Phase, RoundSchedule
    from lightning_defense.defenses.btidbf.torch_model import (
        FeatureMask,
        Purification,
        Purified,
        TriggerInversion,
        Unlearning,
        decoupling_loss,
        generator_loss,
    )

__all__ = [
    "BTIDBF",
    "BTIDBFPurification",
    "BTIDBFUnlearning",
    "FeatureMask",
    "Purification",
    "Phase",
    "Purified",
    "RoundSchedule",
    "TriggerInversion",
    "Unlearning",
    "decoupling_loss",
    "generator_loss",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
