"""Adaptive-Patch: several weak patch triggers and cover samples, against latent-separation
defenses; also the patch helpers the label-consistent attack shares."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_defense.attacks.base import LabelMode
from lightning_defense.attacks.cover import CoveredAttack
from lightning_defense.errors import ConfigurationError


def corner_positions(size: int, height: int, width: int) -> list[tuple[int, int]]:
    """Top-left pixels (row, column) of a ``size`` square in each image corner: top-left,
    top-right, bottom-left, bottom-right."""
    return [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size)]


def paste_patch(images: Tensor, pattern: Tensor, position: tuple[int, int], alpha: float = 1.0) -> Tensor:
    """Blend a CHW ``pattern`` into an NCHW batch, in place, with its top-left pixel at
    ``position``: ``(1 - alpha) x + alpha pattern`` inside the patch (``alpha = 1`` stamps it)."""
    row, col = position
    height, width = pattern.shape[-2:]
    images[..., row : row + height, col : col + width].lerp_(pattern.to(images), alpha)
    return images


class AdaptivePatch(CoveredAttack):
    """Adaptive-Patch (Qi et al., "Revisiting the assumption of latent separability for backdoor
    defenses", ICLR 2023; the preprint's title: "Circumventing backdoor defenses that are based on
    latent separability"), a dirty-label attack built to defeat defenses that separate poisoned
    from clean samples in the network's latent space.

    Each poisoned training image carries *one* of several patch triggers, blended in with that
    trigger's partial ``train_alphas``; ``cover_rate`` of the training set (drawn right after the
    poisoned images, in the same seeded order) carries the triggers the same way but keeps its
    true labels, so no single weak trigger maps to the target by itself. At test time the
    ``test_patches`` are stamped together with ``test_alpha``. Poisoned and cover images are split
    into equal consecutive groups, one per trigger, as the authors' ``poison_tool_box/adaptive_patch.py``
    (vtu81/backdoor-toolbox) does.

    Defaults follow the authors' CIFAR-10 settings where they carry over: four training triggers
    with alphas 0.5, 0.2, 0.5 and 0.3 and full-strength (alpha 1) test triggers (the toolbox's
    ``config.py``). The authors' triggers are shipped logo images (phoenix, firefox, a BadNets
    patch, a Trojan square), mostly in image corners; here each trigger is a square of random
    colours on the uint8 grid, drawn from ``seed``, in a corner by default, 5x5 by default (a size
    of ours: the logos' sizes do not carry over to generated squares). The authors' CIFAR-10
    test trigger is two of the patches (one a shifted variant); by default all patches are stamped
    here. The rates are issue 8's 0.01 poisoned and 0.02 cover (the authors' README uses 0.003
    and 0.006 on CIFAR-10).

    Args:
        cover_rate: share of the training set made cover samples (true labels kept).
        patch_sizes: side in pixels of each trigger square; their count is the number of triggers.
        positions: top-left pixel (row, column) of each trigger; ``None`` puts the triggers in the
            corners (top-left, top-right, bottom-left, bottom-right; at most four).
        train_alphas: blend ratio of each trigger on poisoned and cover training images, in (0, 1].
        test_alpha: blend ratio of the test-time triggers, in (0, 1].
        test_patches: indices of the triggers stamped at test time; ``None`` stamps all of them.
    """

    def __init__(
        self,
        target: int = 0,
        poison_rate: float = 0.01,
        label_mode: LabelMode = "all_to_one",
        seed: int = 0,
        cover_rate: float = 0.02,
        patch_sizes: Sequence[int] = (5, 5, 5, 5),
        positions: Sequence[tuple[int, int]] | None = None,
        train_alphas: Sequence[float] = (0.5, 0.2, 0.5, 0.3),
        test_alpha: float = 1.0,
        test_patches: Sequence[int] | None = None,
    ) -> None:
        super().__init__(target, poison_rate, label_mode, seed, cover_rate)
        patch_sizes, train_alphas = tuple(patch_sizes), tuple(train_alphas)
        count = len(patch_sizes)
        if count == 0 or any(size < 1 for size in patch_sizes):
            raise ConfigurationError(f"patch_sizes must list at least one size >= 1, got {list(patch_sizes)}.")
        if len(train_alphas) != count:
            raise ConfigurationError(
                f"train_alphas has {len(train_alphas)} values for {count} patches (patch_sizes): "
                "give one alpha per patch."
            )
        if positions is None and count > 4:
            raise ConfigurationError(f"{count} patches do not fit the four corners: give their `positions`.")
        if positions is not None and len(positions) != count:
            raise ConfigurationError(f"positions has {len(positions)} entries for {count} patches: give one per patch.")
        if not all(0 < alpha <= 1 for alpha in (*train_alphas, test_alpha)):
            raise ConfigurationError(
                f"train_alphas and test_alpha must be in (0, 1], got {list(train_alphas)} and {test_alpha}."
            )
        if test_patches is not None and (not test_patches or not all(0 <= i < count for i in test_patches)):
            raise ConfigurationError(
                f"test_patches must name at least one patch in 0..{count - 1}, got {list(test_patches)}."
            )
        self.patch_sizes = patch_sizes
        self.positions = tuple(tuple(p) for p in positions) if positions is not None else None
        self.train_alphas = train_alphas
        self.test_alpha = test_alpha
        self.test_patches = tuple(test_patches) if test_patches is not None else None
        # colours on the uint8 grid, so a saved poisoned image holds exactly these patches
        generator = self._generator(1)
        self.patterns = [
            torch.randint(0, 256, (3, size, size), generator=generator).float() / 255 for size in patch_sizes
        ]

    def patch_positions(self, height: int, width: int) -> list[tuple[int, int]]:
        """Where each trigger goes in a ``height`` x ``width`` image; fails, naming the fix, if one
        does not fit."""
        if self.positions is not None:
            positions = list(self.positions)
        else:
            positions = [corner_positions(size, height, width)[i] for i, size in enumerate(self.patch_sizes)]
        for index, ((row, col), size) in enumerate(zip(positions, self.patch_sizes, strict=True)):
            if row < 0 or col < 0 or row + size > height or col + size > width:
                raise ConfigurationError(
                    f"Adaptive-Patch trigger {index} ({size}x{size} at row {row}, column {col}) does not fit in a "
                    f"{height}x{width} image: use smaller patch_sizes or other positions."
                )
        return positions

    def check(self, image_size: tuple[int, int], num_classes: int) -> None:
        super().check(image_size, num_classes)
        self.patch_positions(*image_size)

    def apply(self, images: Tensor) -> Tensor:
        """The test-time trigger: the ``test_patches`` together, at ``test_alpha``."""
        positions = self.patch_positions(*images.shape[-2:])
        out = images.clone()
        for index in self.test_patches if self.test_patches is not None else range(len(self.patterns)):
            paste_patch(out, self.patterns[index], positions[index], self.test_alpha)
        return out

    def apply_training(self, images: Tensor, draw: int = 0) -> Tensor:
        """The training-time triggers: the batch split into equal consecutive groups, group i
        carrying trigger i alone at ``train_alphas[i]``."""
        positions = self.patch_positions(*images.shape[-2:])
        out = images.clone()
        for index, group in enumerate(out.tensor_split(len(self.patterns))):  # views: pasting writes into out
            paste_patch(group, self.patterns[index], positions[index], self.train_alphas[index])
        return out
