"""Training augmentations as torchvision v2 transforms a config names by ``class_path``, and
REFINE's augmentation of a batch (a fresh random draw per image)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from lightning_defense.errors import ConfigurationError, check_probability


class CropFlip(v2.Transform):
    """Random crop after zero padding, and a horizontal flip: the usual training augmentation of
    CIFAR-style classifiers (no flip for data where mirroring changes the meaning, e.g. signs).
    The crop keeps each image's own size."""

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        super().__init__()
        self.padding = padding
        self.flip = flip

    def forward(self, image: Tensor) -> Tensor:
        image = v2.RandomCrop(tuple(image.shape[-2:]), padding=self.padding)(image)
        return v2.RandomHorizontalFlip()(image) if self.flip else image


class RefineAugmentation(v2.Compose):
    """The official REFINE recipe's augmentation: RandomResizedCrop at scale 0.8 to 1, horizontal
    flip, RandomGrayscale p 0.2."""

    def __init__(self, size: int | tuple[int, int] = 32) -> None:
        super().__init__(
            [v2.RandomResizedCrop(size, scale=(0.8, 1.0)), v2.RandomHorizontalFlip(), v2.RandomGrayscale(p=0.2)]
        )


def augment_each(transform: v2.Transform, images: Tensor) -> Tensor:
    """``transform`` on a batch with its own random draw for every image (a v2 transform called
    on a batch draws once for all of it)."""
    return torch.stack([transform(image) for image in images])


class BatchAugmentation(nn.Module):
    """:class:`RefineAugmentation` on a float batch, a random draw per image, in a few tensor ops.

    The crop box is drawn as v2's RandomResizedCrop draws it (10 tries of scale and log-uniform
    aspect ratio, else the whole image), crop, resize and flip are one bilinear resampling
    (``grid_sample``), and grayscale is v2's luma mix where drawn. For the same draw the result
    is v2's (tests/test_augmentation.py), without a Python loop over the images: on the
    device, a batch costs about what one image did.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.8, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        grayscale_p: float = 0.2,
    ) -> None:
        super().__init__()
        self.scale, self.ratio = scale, ratio
        self.flip_p, self.grayscale_p = flip_p, grayscale_p

    def forward(self, images: Tensor) -> Tensor:
        n, device = len(images), images.device
        boxes = random_crop_boxes(n, tuple(images.shape[-2:]), self.scale, self.ratio, device)
        flip = torch.rand(n, device=device) < self.flip_p
        out = resized_crop(images, boxes, flip)
        gray = torch.rand(n, device=device) < self.grayscale_p
        return torch.where(gray[:, None, None, None], TF.rgb_to_grayscale(out, num_output_channels=3), out)


def random_crop_boxes(
    n: int,
    size: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    device: torch.device | None = None,
    tries: int = 10,
) -> Tensor:
    """``n`` boxes ``(top, left, height, width)`` drawn as ``v2.RandomResizedCrop`` draws one:
    the first of ``tries`` draws of area share and log-uniform aspect ratio that fits, else the
    whole image (v2's fallback for aspect ratios inside ``ratio``)."""
    height, width = size
    area = torch.empty(n, tries, device=device).uniform_(*scale) * height * width
    log_ratio = torch.empty(n, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w = (area * log_ratio.exp()).sqrt().round()
    h = (area / log_ratio.exp()).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    found = fits.any(dim=1)
    w = torch.where(found, w.gather(1, first).squeeze(1), torch.full_like(found, width, dtype=w.dtype))
    h = torch.where(found, h.gather(1, first).squeeze(1), torch.full_like(found, height, dtype=h.dtype))
    top = (torch.rand(n, device=device) * (height - h + 1)).floor()
    left = (torch.rand(n, device=device) * (width - w + 1)).floor()
    return torch.stack([top, left, h, w], dim=1)


def resized_crop(images: Tensor, boxes: Tensor, flip: Tensor) -> Tensor:
    """Crop each image to its box ``(top, left, height, width)``, resize it bilinearly to the
    image size and mirror it where ``flip``: one affine resampling of the batch.

    Output pixel i samples the crop at ``left + (i + 0.5) * width / W - 0.5``, as a bilinear
    resize without corner alignment does; ``grid_sample``'s normalized coordinates make that
    ``theta = [[width / W, 0, (2 left + width) / W - 1], [0, height / H, (2 top + height) / H - 1]]``,
    and a mirror negates the first column. Sampling positions are clamped to the crop's pixel
    centres, as the resize of the cropped image clamps them.
    """
    n, _, height, width = images.shape
    top, left, h, w = boxes.to(torch.float32).unbind(dim=1)
    sign = 1 - 2 * flip.to(torch.float32)
    zero = torch.zeros_like(top)
    theta = torch.stack(
        [
            torch.stack([sign * w / width, zero, (2 * left + w) / width - 1], dim=1),
            torch.stack([zero, h / height, (2 * top + h) / height - 1], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, [n, 1, height, width], align_corners=False)
    # the resize of a crop never reads past the crop's last row and column: clamp to its pixel centres
    low = torch.stack([(2 * left + 1) / width, (2 * top + 1) / height], dim=1) - 1
    high = torch.stack([(2 * (left + w) - 1) / width, (2 * (top + h) - 1) / height], dim=1) - 1
    grid = grid.clamp(low[:, None, None, :], high[:, None, None, :])
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False).to(
        images.dtype
    )


class RandomPatches(nn.Module):
    """A trigger-agnostic corruption: squares of fresh uniform noise at random places.

    Each image, with probability ``p``, gets ``count`` squares with sides drawn from
    ``[min_size, max_size]`` pixels, each pixel a new uniform colour: the shape of a patch trigger
    (BadNets' is 3x3 random colours on CIFAR-10) without ever drawing the attacker's own patch.
    Applied to a defender's inputs after the victim labelled them clean, it asks the defense to
    answer as if the patch were not there.
    """

    def __init__(self, p: float = 0.5, count: int = 1, min_size: int = 2, max_size: int = 8) -> None:
        super().__init__()
        check_probability("RandomPatches", p=p)
        if not 1 <= min_size <= max_size:
            raise ConfigurationError(f"RandomPatches: need 1 <= min_size <= max_size, got {min_size} and {max_size}.")
        if count < 1:
            raise ConfigurationError(f"RandomPatches: count must be >= 1, got {count}.")
        self.p, self.count, self.min_size, self.max_size = p, count, min_size, max_size

    def forward(self, images: Tensor) -> Tensor:
        n, _, height, width = images.shape
        device = images.device
        rows = torch.arange(height, device=device)[None, :, None]
        cols = torch.arange(width, device=device)[None, None, :]
        chosen = (torch.rand(n, device=device) < self.p)[:, None, None]
        mask = torch.zeros(n, height, width, dtype=torch.bool, device=device)
        for _ in range(self.count):
            side = torch.randint(self.min_size, self.max_size + 1, (n,), device=device).clamp(max=min(height, width))
            top = (torch.rand(n, device=device) * (height - side + 1)).floor()[:, None, None]
            left = (torch.rand(n, device=device) * (width - side + 1)).floor()[:, None, None]
            side = side[:, None, None]
            mask |= (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
        mask = (mask & chosen)[:, None]
        return torch.where(mask, torch.rand_like(images), images)


class RandomNoiseBlend(nn.Module):
    """A trigger-agnostic corruption: each image, with probability ``p``, blended with a fresh
    uniform-noise image, ``(1 - a) x + a r`` with ``a`` uniform in ``[0, max_alpha]``: the shape of a
    blended trigger (Blended's default pattern is uniform noise at alpha 0.1) without the
    attacker's own pattern."""

    def __init__(self, p: float = 0.5, max_alpha: float = 0.2) -> None:
        super().__init__()
        check_probability("RandomNoiseBlend", p=p)
        if not 0 < max_alpha <= 1:
            raise ConfigurationError(f"RandomNoiseBlend: max_alpha must be in (0, 1], got {max_alpha}.")
        self.p, self.max_alpha = p, max_alpha

    def forward(self, images: Tensor) -> Tensor:
        n = len(images)
        alpha = torch.rand(n, device=images.device) * self.max_alpha
        alpha = torch.where(torch.rand(n, device=images.device) < self.p, alpha, torch.zeros_like(alpha))
        alpha = alpha[:, None, None, None].to(images.dtype)
        return (1 - alpha) * images + alpha * torch.rand_like(images)


class ImageMixup(nn.Module):
    """Mixup of unlabeled images (Zhang et al., 2018, without the labels): each image, with
    probability ``p``, becomes ``lam x + (1 - lam) x'`` with ``x'`` another image of the batch and
    ``lam`` drawn from Beta(``alpha``, ``alpha``). For a defense whose targets are the victim's
    answers, applied before the victim labels the batch: every epoch then shows new images and
    new targets, which a small auxiliary set (a few thousand images) otherwise lacks."""

    def __init__(self, p: float = 0.5, alpha: float = 1.0) -> None:
        super().__init__()
        check_probability("ImageMixup", p=p)
        if not alpha > 0:
            raise ConfigurationError(f"ImageMixup: alpha must be > 0 (the Beta distribution's shape), got {alpha}.")
        self.p, self.alpha = p, alpha

    def forward(self, images: Tensor) -> Tensor:
        n, device = len(images), images.device
        partners = images[torch.randperm(n, device=device)]
        alpha = torch.tensor(self.alpha, device=device)
        lam = torch.distributions.Beta(alpha, alpha).sample((n,))
        lam = torch.where(torch.rand(n, device=device) < self.p, lam, torch.ones_like(lam))
        lam = lam[:, None, None, None].to(images.dtype)
        return lam * images + (1 - lam) * partners
