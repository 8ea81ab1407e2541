"""ShrinkPad as a defense module: nothing to train, so run it with `lightning validate` or
`lightning test`; the algorithm is in :mod:`.torch_model`."""

from __future__ import annotations

from torch import Tensor

from lightning_defense.data.datamodules import served_image_size
from lightning_defense.defenses.base import DefenseModule
from lightning_defense.defenses.shrinkpad.torch_model import ShrinkPadDefense
from lightning_defense.errors import ConfigurationError
from lightning_defense.victims import load_victim


class ShrinkPad(DefenseModule):
    """ShrinkPad around the victim in ``victim``: BA and ASR of victim(shrinkpad(x)) beside the
    victim's own. The random padding offsets come from the run's seed.

    Args:
        victim: path of the victim file.
        shrink: pixels taken off each side length before padding back (the seeds' 4).
    """

    model: ShrinkPadDefense

    def __init__(self, victim: str, shrink: int = 4) -> None:
        victim_model = load_victim(victim)
        super().__init__(victim_model.num_classes)
        self.save_hyperparameters()
        if shrink < 1:
            raise ConfigurationError(f"shrink must be >= 1, got {shrink}.")
        self.model = ShrinkPadDefense(victim_model, shrink)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        size = served_image_size(self.trainer.datamodule)
        if size is not None and self.hparams.shrink >= min(size):
            raise ConfigurationError(
                f"shrink {self.hparams.shrink} takes the whole {size[0]}x{size[1]} image: "
                "take fewer pixels (the seeds' 4)."
            )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        raise ConfigurationError("ShrinkPad has nothing to train: run `lightning validate` or `lightning test`.")

    def configure_optimizers(self) -> None:
        return None
