"""T-MR, traditional model reprogramming: a REFINE baseline with a learned border as T."""

from typing import TYPE_CHECKING

from lightning_defense.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_defense.defenses.tmr.lightning_model import TMR

__all__ = ["TMR"]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
