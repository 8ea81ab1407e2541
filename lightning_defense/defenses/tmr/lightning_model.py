"""T-MR: REFINE's loss around a learned border instead of a UNet (REFINE paper, appendix D.6)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_defense.defenses.components import BorderPerturbation
from lightning_defense.defenses.refine.torch_model import ClassificationLoss
from lightning_defense.defenses.reprogramming import ReprogrammingDefense
from lightning_defense.errors import ConfigurationError
from lightning_defense.victims import read_victim_metadata


class TMR(ReprogrammingDefense):
    """Traditional model reprogramming: T is a :class:`BorderPerturbation` (the image shrunk by
    ``border`` pixels a side inside one learned frame), M and the loss are REFINE's. The
    auxiliary data's labels are never used. The supervised contrastive term is off by default: it
    would pull the outputs of one pseudo-class together, which a universal frame cannot do.

    Args:
        victim: path of the frozen victim.
        image_size: the victim's input size (T's parameters are one image of it); default: the
            size the victim file records.
        border: width of the learned frame in pixels.

    The other arguments are :class:`~lightning_defense.defenses.REFINE`'s.
    """

    def __init__(
        self,
        victim: str,
        image_size: int | None = None,
        border: int = 4,
        use_permutation: bool = True,
        permutation_seed: int = 0,
        classification_loss: ClassificationLoss = "ce",
        contrastive_weight: float = 0.0,
        temperature: float = 0.07,
        soft_label_temperature: float = 4.0,
        augment: bool = True,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_milestones: Sequence[int] = (100, 130),
        lr_gamma: float = 0.8,
    ) -> None:
        super().__init__(
            victim,
            use_permutation=use_permutation,
            permutation_seed=permutation_seed,
            classification_loss=classification_loss,
            contrastive_weight=contrastive_weight,
            temperature=temperature,
            soft_label_temperature=soft_label_temperature,
            augment=augment,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            lr_milestones=lr_milestones,
            lr_gamma=lr_gamma,
        )

    def build_transform_net(self, num_classes: int) -> nn.Module:
        return BorderPerturbation(**self.transform_config())

    def transform_config(self) -> dict[str, Any]:
        if self.hparams.image_size is None:  # resolved into hparams: an export rebuilds T from them
            self.hparams.image_size = victim_image_side(self.hparams.victim)
        return {"image_size": self.hparams.image_size, "border": self.hparams.border}


def victim_image_side(victim: str) -> int:
    """The side of the square images the victim file records."""
    metadata = read_victim_metadata(victim)
    size = metadata.image_size() if metadata is not None else None
    if size is None or size[0] != size[1]:
        raise ConfigurationError(
            f"T-MR needs the victim's (square) input size, and {victim!r} records {size or 'none'}: set "
            "model.init_args.image_size."
        )
    return size[0]
