"""PhysicalBA: BadNets made robust to physical capture."""

from __future__ import annotations

from torchvision.transforms import v2

from lightning_defense.attacks.badnets import BadNets
from lightning_defense.attacks.base import LabelMode


class PhysicalBA(BadNets):
    """PhysicalBA (Li et al., 2021): the BadNets patch on the poisoned training images, and every
    training image, poisoned or not, goes through physical-style transformations (flip, colour
    jitter, a small affine warp) drawn afresh every epoch (:meth:`training_transform`), as in
    BackdoorBox: the backdoor has to survive them. Warping the poisoned images alone would make the
    warp itself a trigger the network can learn instead of the patch. Test images carry the plain patch.

    Args:
        patch_size, position: as :class:`BadNets` (the patch scales with the image by default).
        brightness, contrast: ColorJitter strengths (the seeds' 0.2 and 0.2).
        degrees, translate, scale: RandomAffine (the seeds' 10 degrees, 0.1, 0.8 to 0.9).
    """

    def __init__(
        self,
        target: int = 0,
        poison_rate: float = 0.1,
        label_mode: LabelMode = "all_to_one",
        seed: int = 0,
        patch_size: int | None = None,
        position: tuple[int, int] | None = None,
        brightness: float = 0.2,
        contrast: float = 0.2,
        degrees: float = 10.0,
        translate: float = 0.1,
        scale: tuple[float, float] = (0.8, 0.9),
    ) -> None:
        super().__init__(target, poison_rate, label_mode, seed, patch_size, position)
        self.brightness, self.contrast = brightness, contrast
        self.degrees, self.translate, self.scale = degrees, translate, tuple(scale)

    def training_transform(self) -> v2.Compose:
        return v2.Compose(
            [
                v2.RandomHorizontalFlip(),
                v2.ColorJitter(brightness=self.brightness, contrast=self.contrast),
                v2.RandomAffine(self.degrees, translate=(self.translate, self.translate), scale=self.scale),
            ]
        )
