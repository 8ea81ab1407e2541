"""REFINE's batched augmentation is v2's RandomResizedCrop + flip + grayscale, drawn per image."""

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from lightning_defense.data.augmentation import BatchAugmentation, random_crop_boxes, resized_crop


def test_resized_crop_matches_v2_per_image():
    torch.manual_seed(0)
    images = torch.rand(64, 3, 32, 32)
    boxes = random_crop_boxes(64, (32, 32), (0.3, 1.0), (3 / 4, 4 / 3))
    flip = torch.rand(64) < 0.5
    batched = resized_crop(images, boxes, flip)
    for image, (top, left, h, w), mirrored, out in zip(images, boxes.long().tolist(), flip, batched):
        expected = TF.resized_crop(image, top, left, h, w, [32, 32], antialias=True)
        if mirrored:
            expected = TF.horizontal_flip(expected)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_the_whole_image_unflipped_is_unchanged():
    images = torch.rand(4, 3, 32, 32)
    boxes = torch.tensor([[0, 0, 32, 32]] * 4)
    torch.testing.assert_close(resized_crop(images, boxes, torch.zeros(4, dtype=torch.bool)), images)
    torch.testing.assert_close(resized_crop(images, boxes, torch.ones(4, dtype=torch.bool)), images.flip(-1))


def test_crop_boxes_follow_the_recipe():
    torch.manual_seed(0)
    boxes = random_crop_boxes(20_000, (32, 32), (0.8, 1.0), (3 / 4, 4 / 3))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 1024
    assert area.min() >= 0.7 and area.max() <= 1.0  # 0.8..1 before rounding the sides
    assert ((w / h) >= 0.7).all() and ((w / h) <= 1.4).all()
    assert len(torch.unique(boxes, dim=0)) > 50  # a draw per image, not one for the batch


def test_flip_and_grayscale_rates():
    torch.manual_seed(0)
    images = torch.rand(4000, 3, 8, 8)
    out = BatchAugmentation(scale=(1.0, 1.0), ratio=(1.0, 1.0))(images)  # whole image: flip and gray only
    gray = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    assert gray.float().mean() == pytest.approx(0.2, abs=0.03)
    colour = ~gray
    flipped = (out[colour] - images[colour].flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert flipped.float().mean() == pytest.approx(0.5, abs=0.03)
    assert out.min() >= 0 and out.max() <= 1


def test_random_patches_paste_noise_squares_of_the_drawn_sizes_and_nothing_else():
    from lightning_defense.data.augmentation import RandomPatches

    torch.manual_seed(0)
    images = torch.full((64, 3, 32, 32), 0.5)
    out = RandomPatches(p=1.0, count=1, min_size=2, max_size=5)(images)
    changed = (out != images).any(dim=1)  # noise equal to 0.5 in all three channels: probability ~0
    for mask in changed:
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        side = len(rows)
        assert 2 <= side <= 5 and len(cols) == side  # one square
        assert mask.sum() == side * side
        assert rows.max() - rows.min() + 1 == side and cols.max() - cols.min() + 1 == side
    assert {int(m.any(dim=1).sum()) for m in changed} == {2, 3, 4, 5}  # every size is drawn
    assert changed.any(dim=1).any(dim=1).all()
    assert torch.equal(RandomPatches(p=0.0)(images), images)
    rate = (RandomPatches(p=0.3)(torch.full((4000, 3, 8, 8), 0.5)) != 0.5).flatten(1).any(1).float().mean()
    assert abs(rate - 0.3) < 0.03


def test_random_noise_blend_stays_within_its_alpha_and_rate():
    from lightning_defense.data.augmentation import RandomNoiseBlend

    torch.manual_seed(0)
    images = torch.rand(4000, 3, 8, 8)
    out = RandomNoiseBlend(p=0.5, max_alpha=0.2)(images)
    assert (out - images).abs().max() <= 0.2 + 1e-6  # |a (r - x)| <= a
    assert out.min() >= 0 and out.max() <= 1
    blended = (out != images).flatten(1).any(1).float().mean()
    assert abs(blended - 0.5) < 0.03
    assert torch.equal(RandomNoiseBlend(p=0.0)(images), images)


def test_image_mixup_mixes_two_images_of_the_batch_at_its_rate():
    from lightning_defense.data.augmentation import ImageMixup
    from lightning_defense.errors import ConfigurationError

    torch.manual_seed(0)
    values = torch.arange(4000, dtype=torch.float32) / 4000  # image i is the constant values[i]
    images = values[:, None, None, None].expand(-1, 3, 4, 4).contiguous()
    out = ImageMixup(p=0.5, alpha=1.0)(images)
    flat = out.flatten(1)
    assert torch.equal(flat.min(1).values, flat.max(1).values)  # one weight per image, not per pixel
    mixed = flat[:, 0] != values
    assert abs(mixed.float().mean() - 0.5) < 0.03
    # lam x_i + (1 - lam) x_j with lam in [0, 1]: inside the batch's range, lam itself uniform (Beta(1, 1))
    assert out.min() >= 0 and out.max() <= values.max()
    assert torch.equal(ImageMixup(p=0.0)(images), images)
    # a batch of two images, a = 0 and b = 1: a's partner is a or b (a random permutation), and
    # mixed with b it reads 1 - lam, uniform for Beta(1, 1); a mix with b never stays a
    pair = torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    shares = torch.stack([ImageMixup(p=1.0)(pair)[0, 0, 0, 0] for _ in range(2000)])
    assert abs((shares == 0).float().mean() - 0.5) < 0.05
    assert abs(shares[shares > 0].mean() - 0.5) < 0.03
    for bad in ({"p": 1.5}, {"alpha": 0.0}):
        with pytest.raises(ConfigurationError):
            ImageMixup(**bad)
