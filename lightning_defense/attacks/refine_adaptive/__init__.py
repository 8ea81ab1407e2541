"""REFINE's adaptive attack (REFINE paper, §5.4): the loss in plain torch (:mod:`.torch_model`) and
the task that trains a victim with it (:mod:`.lightning_model`)."""

from typing import TYPE_CHECKING

from lightning_defense.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_defense.attacks.refine_adaptive.lightning_model import RefineAdaptiveVictimTask
    from lightning_defense.attacks.refine_adaptive.torch_model import RefineSimulation

__all__ = ["RefineAdaptiveVictimTask", "RefineSimulation"]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
