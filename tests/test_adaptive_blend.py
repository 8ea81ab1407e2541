"""Adap-Blend (issue 32, part 2): the masked training trigger, the full test trigger, and the sizes
and label rules of the poisoned and cover sets."""

from __future__ import annotations

import pytest
import torch

from lightning_defense.attacks import AdaptiveBlend, attack_from_config
from lightning_defense.attacks.base import to_float, to_uint8
from lightning_defense.errors import ConfigurationError


def test_each_training_image_shows_the_pattern_in_half_of_the_pieces_and_the_test_image_everywhere():
    attack = AdaptiveBlend(train_alpha=0.15, test_alpha=0.2, pieces=16, mask_rate=0.5)
    grey = torch.full((6, 3, 32, 32), 0.5)
    pattern = attack.pattern(32, 32)
    trained = attack.apply_training(grey)
    blended = 0.5 + 0.15 * (pattern - 0.5)
    shown_patterns = []
    for image in trained:
        # per 8x8 piece: either exactly the blend or untouched
        pieces = (image != 0.5).any(0).view(4, 8, 4, 8).any(3).any(1)  # 4 x 4 pieces, True where changed
        assert pieces.sum() == 8  # half of 16 hidden
        shown = pieces.repeat_interleave(8, 0).repeat_interleave(8, 1)
        assert torch.allclose(image[:, shown], blended[:, shown]) and torch.all(image[:, ~shown] == 0.5)
        shown_patterns.append(pieces)
    assert len({tuple(p.flatten().tolist()) for p in shown_patterns}) > 1  # every image its own mask
    assert torch.allclose(attack.apply(grey), 0.5 + 0.2 * (pattern - 0.5))  # whole pattern, stronger


@pytest.mark.parametrize("mode", ["all_to_one", "all_to_all"])
def test_poisoned_and_cover_sets_have_the_configured_sizes_and_label_rules(mode):
    images = to_uint8(torch.rand(500, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    labels = torch.arange(500) % 10
    attack = AdaptiveBlend(target=3, poison_rate=0.02, cover_rate=0.04, label_mode=mode, seed=1)
    poisoned_images, poisoned_labels, indices = attack.poison_training_set(images, labels, 10)
    assert len(indices) == 10
    expected = torch.full((10,), 3) if mode == "all_to_one" else (labels[indices] + 1) % 10
    assert torch.equal(poisoned_labels[indices], expected)
    changed = (images != poisoned_images).flatten(1).any(1).nonzero().flatten().tolist()
    cover = sorted(set(changed) - set(indices.tolist()))
    assert len(changed) == 30 and len(cover) == 20  # 2% poisoned, 4% cover, disjoint
    assert torch.equal(poisoned_labels[cover], labels[cover])
    assert set((poisoned_labels != labels).nonzero().flatten().tolist()) <= set(indices.tolist())
    # training images carry the masked trigger at train_alpha, not the test trigger
    assert torch.equal(poisoned_images[indices], to_uint8(attack.apply_training(to_float(images[indices]))))
    drawn = attack._after_poisoned(500, 10, 20)  # the cover images in the order their masks are drawn
    assert sorted(drawn.tolist()) == cover
    assert torch.equal(poisoned_images[drawn], to_uint8(attack.apply_training(to_float(images[drawn]), draw=1)))
    assert torch.equal(attack.poison_training_set(images, labels, 10)[0], poisoned_images)  # seeded


def test_settings_that_cannot_work_are_refused_and_the_config_round_trips():
    with pytest.raises(ConfigurationError, match="square number"):
        AdaptiveBlend(pieces=10)
    with pytest.raises(ConfigurationError, match="mask_rate"):
        AdaptiveBlend(mask_rate=1.0)
    with pytest.raises(ConfigurationError, match="poison_rate \\+ cover_rate"):
        AdaptiveBlend(poison_rate=0.6, cover_rate=0.5)
    attack = AdaptiveBlend(target=2, pieces=9, seed=5)
    assert attack_from_config(attack.config()).config() == attack.config()
    odd = AdaptiveBlend(pieces=9).apply_training(torch.full((2, 3, 32, 32), 0.5))  # 32 is no multiple of 3
    assert odd.shape == (2, 3, 32, 32)
