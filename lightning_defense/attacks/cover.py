"""Attacks with cover samples (Qi et al., ICLR 2023): besides the relabelled poisoned images, a
share of the training set carries the trigger, weakened, and keeps its true label, so that the
trigger alone does not separate poisoned from clean samples in the victim's latent space."""

from __future__ import annotations

from abc import abstractmethod

from torch import Tensor

from lightning_defense.attacks.base import Attack, LabelMode, to_float, to_uint8
from lightning_defense.errors import ConfigurationError


class CoveredAttack(Attack):
    """An attack whose poisoned and cover training images carry a training-time form of the
    trigger (:meth:`apply_training`), while the poisoned test set carries :meth:`apply`'s.

    Cover images are drawn right after the poisoned ones in the same seeded order, as the
    authors' ``poison_tool_box`` draws them (non-overlapping).

    Args:
        cover_rate: share of the training set made cover samples (true labels kept).
    """

    def __init__(
        self,
        target: int = 0,
        poison_rate: float = 0.01,
        label_mode: LabelMode = "all_to_one",
        seed: int = 0,
        cover_rate: float = 0.02,
    ) -> None:
        super().__init__(target, poison_rate, label_mode, seed)
        if not 0 <= cover_rate < 1 or poison_rate + cover_rate > 1:
            raise ConfigurationError(
                f"cover_rate must be in [0, 1) and poison_rate + cover_rate <= 1, got {cover_rate} with "
                f"poison_rate {poison_rate}."
            )
        self.cover_rate = cover_rate

    @abstractmethod
    def apply_training(self, images: Tensor, draw: int = 0) -> Tensor:
        """The training-time trigger on a float batch; ``draw`` tells the poisoned images (0)
        from the cover images (1) for attacks that draw randomness per image."""

    def poison_training_set(self, images: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
        clean = images
        images, labels, poisoned = super().poison_training_set(images, labels, num_classes)
        cover = self._after_poisoned(len(images), len(poisoned), round(self.cover_rate * len(images)))
        # training images carry the training-time trigger, not the test-time one the base class stamped
        for draw, indices in enumerate((poisoned, cover)):
            if len(indices):
                images[indices] = to_uint8(self.apply_training(to_float(clean[indices]), draw))
        return images, labels, poisoned
