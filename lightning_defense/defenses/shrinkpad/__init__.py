"""ShrinkPad: shrink the input and pad it back at a random position."""

from typing import TYPE_CHECKING

from lightning_defense.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_defense.defenses.shrinkpad.lightning_model import ShrinkPad
    from lightning_defense.defenses.shrinkpad.torch_model import ShrinkPadDefense, ShrinkPadTransform

__all__ = ["ShrinkPad", "ShrinkPadDefense", "ShrinkPadTransform"]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
