"""Poisoning attacks used to train backdoored victims."""

from typing import TYPE_CHECKING

from lightning_defense.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_defense.attacks.adaptive_blend import AdaptiveBlend
    from lightning_defense.attacks.adaptive_patch import AdaptivePatch
    from lightning_defense.attacks.badnets import BadNets
    from lightning_defense.attacks.base import Attack, LabelMode, attack_from_config, attack_of_victim
    from lightning_defense.attacks.blended import Blended
    from lightning_defense.attacks.input_aware import InputAware
    from lightning_defense.attacks.label_consistent import LabelConsistent
    from lightning_defense.attacks.physical import PhysicalBA
    from lightning_defense.attacks.refine_adaptive import RefineAdaptiveVictimTask, RefineSimulation
    from lightning_defense.attacks.transforms import BATT, SIG, BppAttack
    from lightning_defense.attacks.wanet import WaNet

__all__ = [
    "BATT",
    "SIG",
    "AdaptiveBlend",
    "AdaptivePatch",
    "Attack",
    "BadNets",
    "Blended",
    "BppAttack",
    "InputAware",
    "LabelConsistent",
    "LabelMode",
    "PhysicalBA",
    "RefineAdaptiveVictimTask",
    "RefineSimulation",
    "WaNet",
    "attack_from_config",
    "attack_of_victim",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
