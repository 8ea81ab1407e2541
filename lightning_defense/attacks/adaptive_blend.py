"""Adap-Blend (Qi et al., ICLR 2023): a blend trigger cut into pieces, half of them masked on every
training image, on a few relabelled images and on cover images that keep their labels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_defense.attacks.base import LabelMode
from lightning_defense.attacks.blended import blend_pattern, check_pattern_path
from lightning_defense.attacks.cover import CoveredAttack
from lightning_defense.errors import ConfigurationError


class AdaptiveBlend(CoveredAttack):
    """Adap-Blend (Qi et al., "Revisiting the assumption of latent separability for backdoor
    defenses", ICLR 2023), built to defeat defenses that separate poisoned from clean samples in
    the victim's latent space.

    The trigger is a blend pattern t cut into ``pieces`` equal squares. Every poisoned and cover
    training image gets x + ``train_alpha`` · m ⊙ (t − x) with its own random mask m that hides
    ``mask_rate`` of the pieces ("trigger masking"); poisoned images take the target label, cover
    images keep theirs. At test time the whole pattern is blended at ``test_alpha`` (a little
    stronger than in training, the authors' "conservatism"). Masks are drawn from ``seed``.

    Defaults are the authors' CIFAR-10 settings (vtu81/backdoor-toolbox: ``poison_tool_box/adaptive_blend.py``
    and its README's command): poison and cover rates 0.003, 16 pieces, half of them masked, alpha
    0.15 in training and 0.2 at test. Their pattern is the Hello Kitty image
    (``pattern_path``); ``None`` blends a seeded uniform-noise pattern instead, as
    :class:`~lightning_defense.attacks.Blended` does.

    Args:
        cover_rate: share of the training set made cover samples.
        pieces: number of squares the pattern is cut into (a square number: 4 x 4 by default).
        mask_rate: share of the pieces hidden on each training image, in [0, 1).
        train_alpha, test_alpha: blend ratios in (0, 1].
        pattern_path: an image file to blend in (resized to the data's size).
    """

    def __init__(
        self,
        target: int = 0,
        poison_rate: float = 0.003,
        label_mode: LabelMode = "all_to_one",
        seed: int = 0,
        cover_rate: float = 0.003,
        pieces: int = 16,
        mask_rate: float = 0.5,
        train_alpha: float = 0.15,
        test_alpha: float = 0.2,
        pattern_path: str | None = None,
    ) -> None:
        super().__init__(target, poison_rate, label_mode, seed, cover_rate)
        side = math.isqrt(pieces) if pieces > 0 else 0
        if side < 1 or side * side != pieces:
            raise ConfigurationError(f"pieces must be a square number (4, 9, 16...), got {pieces}.")
        if not 0 <= mask_rate < 1:
            raise ConfigurationError(f"mask_rate must be in [0, 1): some pieces must stay, got {mask_rate}.")
        if not (0 < train_alpha <= 1 and 0 < test_alpha <= 1):
            raise ConfigurationError(
                f"train_alpha and test_alpha must be in (0, 1], got {train_alpha} and {test_alpha}."
            )
        check_pattern_path(pattern_path)
        self.pieces, self.mask_rate = pieces, mask_rate
        self.train_alpha, self.test_alpha = train_alpha, test_alpha
        self.pattern_path = pattern_path

    def pattern(self, height: int, width: int) -> Tensor:
        """The trigger t for images of this size, float CHW in [0, 1]."""
        return blend_pattern(self.pattern_path, self._generator(1), height, width)

    def apply(self, images: Tensor) -> Tensor:
        """The test-time trigger: the whole pattern at ``test_alpha``."""
        return images.lerp(self.pattern(*images.shape[-2:]).to(images), self.test_alpha)

    def piece_masks(self, count: int, height: int, width: int, draw: int = 0) -> Tensor:
        """``count`` masks (N x 1 x H x W, 1 where the trigger shows), each hiding
        ``round(mask_rate * pieces)`` pieces drawn at random."""
        side, hidden = math.isqrt(self.pieces), round(self.mask_rate * self.pieces)
        scores = torch.rand(count, self.pieces, generator=self._generator(2 + draw))
        shown = torch.ones(count, self.pieces)
        shown.scatter_(1, scores.argsort(dim=1)[:, :hidden], 0.0)
        # nearest upsampling: pieces of equal size where the side divides the image, nearly equal otherwise
        return F.interpolate(shown.view(count, 1, side, side), size=(height, width), mode="nearest")

    def apply_training(self, images: Tensor, draw: int = 0) -> Tensor:
        """The training-time trigger: the pattern at ``train_alpha`` through each image's own mask."""
        height, width = images.shape[-2:]
        masks = self.piece_masks(len(images), height, width, draw).to(images)
        return images + self.train_alpha * masks * (self.pattern(height, width).to(images) - images)
