"""T-MR, traditional model reprogramming: a REFINE baseline with a learned border as T."""

from lightning_defense.defenses.tmr.lightning_model import TMR

__all__ = ["TMR"]
