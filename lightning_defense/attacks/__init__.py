"""Poisoning attacks used to train backdoored victims."""

from lightning_defense.attacks.badnets import BadNets
from lightning_defense.attacks.base import Attack, LabelMode, attack_from_config
from lightning_defense.attacks.blended import Blended
from lightning_defense.attacks.wanet import WaNet

__all__ = ["Attack", "BadNets", "Blended", "LabelMode", "WaNet", "attack_from_config"]
