"""IAD, the input-aware dynamic attack: an attack that learns, shaped like a defense: its
generators, losses and poisoning in plain torch (:mod:`.torch_model`), the LightningModule that
trains a victim and the generators together (:mod:`.lightning_model`)."""

from typing import TYPE_CHECKING

from lightning_defense.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_defense.attacks.input_aware.lightning_model import InputAwareVictimTask
    from lightning_defense.attacks.input_aware.lightning_model import (
        InputAwareVictimTrainer as InputAwareVictimTrainer,  # its earlier name
    )
    from lightning_defense.attacks.input_aware.torch_model import (
        InputAware,
        InputAwareGenerators,
        diversity_loss,
        mask_norm_loss,
        mask_pretraining_losses,
        partners,
        save_generators,
    )

__all__ = [
    "InputAware",
    "InputAwareGenerators",
    "InputAwareVictimTask",
    "diversity_loss",
    "mask_norm_loss",
    "mask_pretraining_losses",
    "partners",
    "save_generators",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
