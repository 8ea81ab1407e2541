"""ShrinkPad: shrink the input and pad it back at a random position."""

from lightning_defense.defenses.shrinkpad.lightning_model import ShrinkPad
from lightning_defense.defenses.shrinkpad.torch_model import ShrinkPadDefense, ShrinkPadTransform

__all__ = ["ShrinkPad", "ShrinkPadDefense", "ShrinkPadTransform"]
