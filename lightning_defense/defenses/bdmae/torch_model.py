"""BDMAE (Sun et al., 2023, "Mask and Restore: Blind Backdoor Defense at Test Time with Masked
Autoencoder"): a test-time defense for a victim that answers hard labels only. For each test
image it scores the tokens of an MAE's grid by how likely they hold a trigger, then restores the
likely ones with the MAE and classifies the restored image; nothing is trained against the victim.

1. Scores. ``repeats`` times, ``masks_per_repeat`` random masks of ``mask_ratio`` of the tokens,
   cut in turn from random permutations so that every token is masked at least once per repeat,
   are restored (eq. 1) and fused (eq. 2). The image score of a token is 1 - SSIM(image, fused)
   pooled over its cell, averaged over the repeats; its label score is the share of all masks
   that mask it and change the victim's label.
2. Topology-aware refinement, ``refine_steps`` per score: among the top-scored tokens, grow a
   local set of half of them, each pick drawn with priority U(0, 1) * (score + ``neighbour_bonus``
   for neighbours of the set), restore it, and move ``refine_step_size`` of score from the rest of
   the top tokens to the set when the label changed (the set holds the trigger), the other way
   when it did not.
3. Adaptive restoration: with S = the weighted mean of both scores, restore the tokens above
   each of ``thresholds`` (nested masks), fuse the restorations, and ask the victim once more.

The victim is reached through :class:`HardLabelOracle` only: labels, never logits or gradients.
Every random draw comes from torch's global generator on the images' device, so a seeded run
repeats. Images are processed together, and all the restorations of a stage go through the MAE
and the victim in chunks of ``chunk_size`` images.

Deviations from the authors' code (``defense/BDMAE.py``), each for a result that does not depend
on which images share a batch: masks are drawn per image (theirs: one draw per batch), and the
mask sizes of the refinement and the thresholds' raise are per image (theirs: batch averages).
The top set of a refinement step has an even size, twice the local set's, so the step keeps the
mean score exactly (theirs is off by one token when the count is odd).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

from lightning_defense.defenses.bdmae.mae import token_mask_to_pixels
from lightning_defense.errors import ConfigurationError


class Restorer(Protocol):
    """What BDMAE needs of an MAE: its token grid and eq. 1 (see
    :meth:`~lightning_defense.defenses.bdmae.mae.MaskedAutoencoder.restore`)."""

    grid_size: tuple[int, int]
    num_tokens: int

    def restore(self, images: Tensor, token_mask: Tensor) -> Tensor: ...


class HardLabelOracle(nn.Module):
    """The victim as a hard-label black box: ``labels = oracle(images)``.

    The classifier's outputs are reduced to their argmax here, under ``torch.no_grad``, so nothing
    that asks the oracle sees a logit or can pass a gradient through the victim. ``queries``
    counts the images asked so far.
    """

    def __init__(self, classifier: nn.Module, chunk_size: int = 1024) -> None:
        super().__init__()
        self.classifier = classifier
        self.chunk_size = chunk_size
        self.queries = 0

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        self.queries += len(images)
        return torch.cat([self.classifier(chunk).argmax(dim=1) for chunk in images.split(self.chunk_size)])


class PurifiedBatch(NamedTuple):
    """What BDMAE makes of a batch: the purified images, the final token scores (N, L) and the
    largest restored token mask (N, L)."""

    images: Tensor
    scores: Tensor
    token_mask: Tensor


def restore_in_chunks(restorer: Restorer, images: Tensor, token_mask: Tensor, chunk_size: int) -> Tensor:
    """Eq. 1 for many (image, mask) rows, ``chunk_size`` rows per MAE call."""
    pieces = zip(images.split(chunk_size), token_mask.split(chunk_size), strict=True)
    return torch.cat([restorer.restore(chunk, mask) for chunk, mask in pieces])


def fuse_restorations(images: Tensor, restorations: Tensor, pixel_masks: Tensor) -> Tensor:
    """Eq. 2: every pixel is the mean of the restorations (K, N, C, H, W) whose mask (K, N, 1, H, W)
    covers it, and the image's own where none does."""
    counts = pixel_masks.sum(dim=0)
    total = (restorations * pixel_masks).sum(dim=0)
    return torch.where(counts > 0, total / counts.clamp(min=1), images)


def covering_token_masks(
    batch: int, repeats: int, masks_per_repeat: int, num_tokens: int, mask_ratio: float, device: torch.device
) -> Tensor:
    """(batch, repeats, masks_per_repeat, L) masks of ``int(L * mask_ratio)`` tokens each, cut one
    after the other from a chain of random permutations of the tokens: as long as
    ``masks_per_repeat * mask_ratio >= 1``, every token is masked at least once in every repeat."""
    size = int(num_tokens * mask_ratio)
    chain = math.ceil(masks_per_repeat * size / num_tokens)
    order = torch.rand(batch, repeats, chain, num_tokens, device=device).argsort(dim=-1).flatten(2)
    picks = order[..., : masks_per_repeat * size].reshape(batch, repeats, masks_per_repeat, size)
    masks = torch.zeros(batch, repeats, masks_per_repeat, num_tokens, dtype=torch.bool, device=device)
    return masks.scatter_(-1, picks, True)


def grid_adjacency(grid_size: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """(L, L) boolean: tokens that share a side on the grid (4-neighbourhood)."""
    rows, cols = grid_size
    index = torch.arange(rows * cols, device=device)
    row, col = index // cols, index % cols
    return (row[:, None] - row[None]).abs() + (col[:, None] - col[None]).abs() == 1


def grow_local_token_set(
    scores: Tensor, candidates: Tensor, sizes: Tensor, adjacency: Tensor, neighbour_bonus: float
) -> Tensor:
    """A local set of ``sizes[i]`` tokens among ``candidates[i]`` per row (N, L), grown one token at
    a time: each pick maximizes U(0, 1) * (score + ``neighbour_bonus`` if it touches the set), so
    high scores and contiguity are preferred and randomness explores."""
    rows = torch.arange(len(scores), device=scores.device)
    selected = torch.zeros_like(candidates)
    neighbours = torch.zeros_like(candidates)
    for step in range(int(sizes.max()) if len(sizes) else 0):
        priority = torch.rand_like(scores) * (scores + neighbour_bonus * neighbours)
        pick = priority.masked_fill(~candidates | selected, -math.inf).argmax(dim=1)
        growing = step < sizes
        selected[rows[growing], pick[growing]] = True
        neighbours = (neighbours | (adjacency[pick] & growing[:, None])) & ~selected
    return selected


def refine_scores(
    scores: Tensor,
    images: Tensor,
    labels: Tensor,
    candidate_counts: Tensor,
    restorer: Restorer,
    oracle: HardLabelOracle,
    steps: int = 10,
    step_size: float = 0.05,
    neighbour_bonus: float = 0.5,
    chunk_size: int = 1024,
) -> Tensor:
    """Topology-aware refinement of token scores (N, L) of ``images`` whose victim labels are
    ``labels``. Per row and step: the top ``2 * (candidate_counts // 2)`` tokens are split into a
    grown local set and the rest, the local set is restored, and ``step_size`` is added to the
    set and taken from the rest if the label changed, the reverse if not. The two halves are
    equal, so each row's mean score stays the same. Rows with fewer than two candidates keep
    their scores and cost no query."""
    scores = scores.clone()
    half = candidate_counts // 2
    active = (half > 0).nonzero().squeeze(1)
    if len(active) == 0:
        return scores
    images, labels, half = images[active], labels[active], half[active]
    adjacency = grid_adjacency(restorer.grid_size, scores.device)
    for _ in range(steps):
        current = scores[active]
        ranks = current.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        top = ranks < 2 * half.unsqueeze(1)
        local = grow_local_token_set(current, top, half, adjacency, neighbour_bonus)
        changed = oracle(restore_in_chunks(restorer, images, local, chunk_size)) != labels
        direction = torch.where(changed, step_size, -step_size).unsqueeze(1)
        scores[active] = current + direction * (local.float() - (top & ~local).float())
    return scores


def adaptive_token_masks(
    scores: Tensor,
    thresholds: Sequence[float],
    max_share: float = 0.25,
    raise_factor: float = 0.99,
    max_raises: int = 200,
) -> Tensor:
    """Nested token masks (K, N, L), one per threshold from the highest (smallest mask) to the
    lowest: tokens whose score reaches it. Where the lowest would mask ``max_share`` of an image's
    tokens or more, all its thresholds are raised together, t -> 1 - (1 - t) * ``raise_factor``,
    until it does not (at most ``max_raises`` times; the authors' cap on the restored area)."""
    levels = torch.tensor(sorted(thresholds, reverse=True), dtype=scores.dtype, device=scores.device)
    raises = torch.arange(max_raises + 1, device=scores.device)
    keep = raise_factor ** raises.to(scores.dtype)  # (R,)
    lowest = 1 - (1 - levels[-1]) * keep
    shares = (scores.unsqueeze(0) >= lowest[:, None, None]).float().mean(dim=2)  # (R, N)
    small_enough = shares < max_share
    first = torch.where(small_enough.any(dim=0), small_enough.float().argmax(dim=0), max_raises)
    per_image = 1 - (1 - levels[:, None]) * keep[first].unsqueeze(0)  # (K, N)
    return scores.unsqueeze(0) >= per_image.unsqueeze(-1)


def image_scores_from_ssim(images: Tensor, fused: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """1 - SSIM(image, fused restoration) per pixel (mean over channels), averaged over each token's cell: (N, L)."""
    # in float32 even under bf16 autocast: SSIM's constants (1e-4, 9e-4) are below bf16's resolution
    with torch.autocast(images.device.type, enabled=False):
        _, ssim_map = structural_similarity_index_measure(
            fused.float(), images.float(), data_range=1.0, reduction="none", return_full_image=True
        )
    return 1 - F.adaptive_avg_pool2d(ssim_map.mean(dim=1, keepdim=True), grid_size).flatten(1)


class BDMAEDefense(nn.Module):
    """The defended model: the victim's hard label of the BDMAE-purified image.

    Args:
        victim: the classifier (logits out); only its hard labels are used.
        mae: the restorer, e.g. a :class:`~lightning_defense.defenses.bdmae.mae.MaskedAutoencoder`.
        repeats: N_o, repeats of the random-mask scoring.
        masks_per_repeat: random masks per repeat, each restored and queried.
        mask_ratio: share of the tokens in each random mask.
        refine_steps: N_r, refinement steps for each of the two scores.
        refine_step_size: beta_0, score moved per refinement step.
        neighbour_bonus: priority added to neighbours of the growing local set.
        image_candidate_threshold: image scores at or above it are the image score's top set
            (the label score's top set is as large as its mean times the token count).
        image_score_weight: weight of the image score in the final score (the rest: label score).
        thresholds: score thresholds of the nested restorations.
        max_restored_share: the largest restoration covers less than this share of the tokens.
        chunk_size: images per MAE or victim call.
    """

    def __init__(
        self,
        victim: nn.Module,
        mae: nn.Module,
        repeats: int = 5,
        masks_per_repeat: int = 5,
        mask_ratio: float = 0.75,
        refine_steps: int = 10,
        refine_step_size: float = 0.05,
        neighbour_bonus: float = 0.5,
        image_candidate_threshold: float = 0.2,
        image_score_weight: float = 0.5,
        thresholds: Sequence[float] = (0.6, 0.55, 0.5, 0.45, 0.4),
        max_restored_share: float = 0.25,
        chunk_size: int = 1024,
    ) -> None:
        super().__init__()
        checks = {
            "repeats": repeats >= 1,
            "masks_per_repeat": masks_per_repeat >= 1,
            "mask_ratio": 0 < mask_ratio < 1,
            "refine_steps": refine_steps >= 0,
            "refine_step_size": refine_step_size >= 0,
            "image_score_weight": 0 <= image_score_weight <= 1,
            "thresholds": len(thresholds) > 0 and all(0 < t <= 1 for t in thresholds),
            "max_restored_share": 0 < max_restored_share <= 1,
            "chunk_size": chunk_size >= 1,
        }
        settings = locals()
        wrong = [name for name, ok in checks.items() if not ok]
        if wrong:
            raise ConfigurationError(
                f"BDMAE settings out of range: {', '.join(f'{n}={settings[n]!r}' for n in wrong)}. Counts must be "
                ">= 1 (refine_steps >= 0), ratios, weights, shares and thresholds in (0, 1]."
            )
        if masks_per_repeat * int(mae.num_tokens * mask_ratio) < mae.num_tokens:
            raise ConfigurationError(
                f"{masks_per_repeat} masks of {mask_ratio:.0%} of the tokens cannot mask every token once: "
                "raise masks_per_repeat or mask_ratio."
            )
        self.oracle = HardLabelOracle(victim, chunk_size)
        self.mae = mae
        self.repeats, self.masks_per_repeat, self.mask_ratio = repeats, masks_per_repeat, mask_ratio
        self.refine_steps, self.refine_step_size, self.neighbour_bonus = refine_steps, refine_step_size, neighbour_bonus
        self.image_candidate_threshold = image_candidate_threshold
        self.image_score_weight = image_score_weight
        self.thresholds = tuple(thresholds)
        self.max_restored_share = max_restored_share
        self.chunk_size = chunk_size

    def restore(self, images: Tensor, token_mask: Tensor) -> Tensor:
        return restore_in_chunks(self.mae, images, token_mask, self.chunk_size)

    def pixel_masks(self, token_mask: Tensor, image_size: Sequence[int]) -> Tensor:
        return token_mask_to_pixels(token_mask, self.mae.grid_size, image_size)

    def initial_scores(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Image-based and label-based token scores (N, L) from the random masks."""
        batch, (channels, height, width) = len(images), images.shape[1:]
        repeats, masks = self.repeats, self.masks_per_repeat
        token_masks = covering_token_masks(batch, repeats, masks, self.mae.num_tokens, self.mask_ratio, images.device)
        flat = token_masks.flatten(0, 2)  # image-major: (image, repeat, mask)
        restored = self.restore(images.repeat_interleave(repeats * masks, dim=0), flat)

        changed = (self.oracle(restored) != labels.repeat_interleave(repeats * masks)).view(batch, repeats, masks)
        label_scores = (token_masks & changed.unsqueeze(-1)).float().mean(dim=(1, 2))

        # eq. 2 within each repeat: (mask, image * repeat, ...)
        restored = restored.reshape(batch * repeats, masks, channels, height, width).transpose(0, 1)
        pixels = (
            self.pixel_masks(flat, (height, width)).reshape(batch * repeats, masks, 1, height, width).transpose(0, 1)
        )
        originals = images.repeat_interleave(repeats, dim=0)
        fused = fuse_restorations(originals, restored, pixels)
        image_scores = image_scores_from_ssim(originals, fused, self.mae.grid_size).view(batch, repeats, -1).mean(1)
        return image_scores, label_scores

    def refine(
        self, images: Tensor, labels: Tensor, image_scores: Tensor, label_scores: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Both scores refined, in one pass over the stacked rows."""
        image_candidates = (image_scores >= self.image_candidate_threshold).sum(dim=1)
        # the label score's top set: its mean times the token count (a small margin against float error)
        label_candidates = (label_scores.sum(dim=1) + 1e-4).long()
        refined = refine_scores(
            torch.cat([image_scores, label_scores]),
            images.repeat(2, 1, 1, 1),
            labels.repeat(2),
            torch.cat([image_candidates, label_candidates]),
            self.mae,
            self.oracle,
            self.refine_steps,
            self.refine_step_size,
            self.neighbour_bonus,
            self.chunk_size,
        )
        return refined[: len(images)], refined[len(images) :]

    @torch.no_grad()
    def purify(self, images: Tensor) -> PurifiedBatch:
        """BDMAE's restored images for [0, 1] ``images``."""
        labels = self.oracle(images)
        image_scores, label_scores = self.refine(images, labels, *self.initial_scores(images, labels))
        scores = self.image_score_weight * image_scores + (1 - self.image_score_weight) * label_scores
        token_masks = adaptive_token_masks(scores, self.thresholds, self.max_restored_share)  # (K, N, L)
        levels = len(token_masks)
        restored = self.restore(images.repeat(levels, 1, 1, 1), token_masks.flatten(0, 1))
        pixels = self.pixel_masks(token_masks.flatten(0, 1), images.shape[-2:])
        purified = fuse_restorations(
            images, restored.reshape(levels, *images.shape), pixels.reshape(levels, len(images), 1, *images.shape[-2:])
        )
        return PurifiedBatch(purified, scores, token_masks[-1])

    def forward(self, images: Tensor) -> Tensor:
        """The victim's hard labels of the purified images."""
        return self.oracle(self.purify(images).images)
