"""REFINE: input transformation + label permutation around a frozen victim."""

import importlib
from typing import TYPE_CHECKING

from lightning_defense.deprecation import warn_renamed
from lightning_defense.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_defense.defenses.components import (
        LabelPermutation,
        TransformNet,
        derangement,
        export_program,
        load_defended,
        save_defended,
    )
    from lightning_defense.defenses.refine.lightning_model import REFINE, BlackBoxREFINE
    from lightning_defense.defenses.refine.torch_model import RefineModel, supervised_contrastive_loss, surrogate_loss

__all__ = [
    "REFINE",
    "BlackBoxREFINE",
    "export_program",
    "load_defended",
    "save_defended",
    "LabelPermutation",
    "RefineModel",
    "TransformNet",
    "derangement",
    "surrogate_loss",
    "supervised_contrastive_loss",
]

_exports, __dir__ = lazy_exports(__name__, __file__)
#: earlier names, kept for one release: where each object is now
_MOVED = {
    "Refine": "lightning_defense.defenses.refine.RefineModel",
    "TransformGrid": "lightning_defense.training.callbacks.TransformGrid",
}


def __getattr__(name: str) -> object:
    if name not in _MOVED:
        return _exports(name)
    new_path = _MOVED[name]
    warn_renamed(f"{__name__}.{name}", new_path)
    module, attribute = new_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), attribute)
