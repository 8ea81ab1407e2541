"""Neural Cleanse (Wang et al., IEEE S&P 2019), in plain torch.

For every class c, a trigger (mask m_c in [0, 1]^{H x W} and pattern p_c in [0, 1]^{C x H x W})
is reverse-engineered as the smallest change that sends any image to c:

    min  CE(F((1 - m_c) ⊙ x + m_c ⊙ p_c), c) + λ_c · |m_c|_1.

A backdoor's target needs a far smaller mask than any other class. The L1 norms of the best masks
are compared with the median absolute deviation (MAD): the anomaly index of class c is
|n_c − median(n)| / (1.4826 · MAD(n)), and a class whose norm is below the median with an
index above 2 is flagged. The mitigation unlearns the flagged trigger: a copy of the victim is
fine-tuned on the defender's labelled images of which a share carries the reversed trigger and
keeps its true label.

Every class's trigger is learnt in the same step: a batch is split among the classes (image i
gets class i mod K). λ_c follows the published schedule in spirit: it starts at ``initial_cost``
and, after each window of ``cost_patience`` steps, grows by ``cost_multiplier`` when the trigger
reached ``success_threshold`` of its images in that window and shrinks by ``cost_multiplier^1.5``
when it did not (the official code counts its patience in mini-batch epochs); the smallest mask
that reached the threshold is kept. The unlearning is :class:`~lightning_defense.defenses.finetune.FineTuning`'s
step on such batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_defense.defenses.finetune.torch_model import FineTuning
from lightning_defense.errors import ConfigurationError
from lightning_defense.victims.classifier import Classifier

#: the MAD's consistency constant for normally distributed norms (the paper's)
MAD_CONSISTENCY = 1.4826


def median(values: Tensor) -> Tensor:
    """The median, the mean of the two middle values for an even count (numpy's, the official code's)."""
    return values.double().quantile(0.5)


def anomaly_indices(norms: Tensor) -> Tensor:
    """|n_c − median| / (1.4826 · MAD) of every class's mask norm (0 where all norms are equal)."""
    norms = norms.double()
    center = median(norms)
    deviation = MAD_CONSISTENCY * median((norms - center).abs())
    if deviation == 0:
        return torch.zeros_like(norms)
    return (norms - center).abs() / deviation


def most_anomalous(norms: Tensor) -> int:
    """The class with the largest anomaly index among those whose mask norm is below the median
    (a backdoor makes its target's mask small); class 0 when no norm is below the median."""
    below = norms.double() < median(norms)
    indices = anomaly_indices(norms)
    return int(torch.where(below, indices, torch.full_like(indices, -1.0)).argmax())


def flagged_target(norms: Tensor, threshold: float = 2.0) -> int:
    """The flagged class with the largest anomaly index (norm below the median, index above
    ``threshold``), or -1 when no class is flagged."""
    candidate = most_anomalous(norms)
    below = bool(norms.double()[candidate] < median(norms))
    return candidate if below and bool(anomaly_indices(norms)[candidate] > threshold) else -1


class ReversedTriggers(nn.Module):
    """A mask and a pattern per class, each in (0, 1) through a sigmoid, and the best of each so
    far (buffers: saved with the weights, so a resumed run keeps them)."""

    def __init__(self, num_classes: int, channels: int, height: int, width: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        # a small random start (about 5% of a pixel): a zero-gradient start would leave all masks alike
        self.mask_logits = nn.Parameter(torch.randn(num_classes, 1, height, width, generator=generator) - 3)
        self.pattern_logits = nn.Parameter(torch.randn(num_classes, channels, height, width, generator=generator))
        self.register_buffer("best_masks", torch.zeros(num_classes, 1, height, width))
        self.register_buffer("best_patterns", torch.zeros(num_classes, channels, height, width))
        self.register_buffer("best_norms", torch.zeros(num_classes))
        self.register_buffer("found", torch.zeros(num_classes, dtype=torch.bool))  # a trigger succeeded

    @property
    def num_classes(self) -> int:
        return len(self.mask_logits)

    def masks(self) -> Tensor:
        return torch.sigmoid(self.mask_logits)

    def patterns(self) -> Tensor:
        return torch.sigmoid(self.pattern_logits)

    def stamp(self, images: Tensor, classes: Tensor, final: bool = False) -> Tensor:
        """Each image with the trigger of its class, (1 − m) ⊙ x + m ⊙ p: the one being learnt, or
        with ``final`` the one :meth:`final_triggers` reports."""
        masks, patterns = self.final_triggers() if final else (self.masks(), self.patterns())
        mask, pattern = masks[classes].to(images.dtype), patterns[classes].to(images.dtype)
        return (1 - mask) * images + mask * pattern

    def mask_norms(self) -> Tensor:
        """|m_c|_1 of the current masks."""
        return self.masks().flatten(1).sum(dim=1)

    @torch.no_grad()
    def keep_best(self, succeeded: Tensor) -> None:
        """Keep each current trigger that ``succeeded`` with a smaller mask than the best so far."""
        norms = self.mask_norms()
        better = succeeded & (~self.found | (norms < self.best_norms))
        self.found |= better
        self.best_norms[better] = norms[better]
        self.best_masks[better] = self.masks()[better]
        self.best_patterns[better] = self.patterns()[better]

    def final_norms(self) -> Tensor:
        """The best mask's norm per class, or the current one for a class that never succeeded."""
        return torch.where(self.found, self.best_norms, self.mask_norms().detach())

    @torch.no_grad()
    def final_triggers(self) -> tuple[Tensor, Tensor]:
        """Masks and patterns: the best per class, or the current ones for a class that never succeeded."""
        found = self.found[:, None, None, None]
        return torch.where(found, self.best_masks, self.masks()), torch.where(
            found, self.best_patterns, self.patterns()
        )


class NeuralCleanseModel(FineTuning):
    """Trigger reverse-engineering for every class, detection by MAD, and unlearning on a repaired
    copy of the victim (the defended model).

    Args:
        victim: the frozen classifier F.
        image_shape: (channels, height, width) of its inputs.
        initial_cost: λ at the start, for every class (official 1e-3).
        cost_multiplier: λ's growth after a successful window; it shrinks by its 1.5th power
            (official 1.5).
        success_threshold: the share of a window's images a trigger must send to its class
            (official 0.99).
        unlearn_fraction: share of each unlearning batch stamped with the flagged trigger, true
            labels kept (official 0.2).
    """

    def __init__(
        self,
        victim: Classifier,
        image_shape: tuple[int, int, int],
        initial_cost: float = 1e-3,
        cost_multiplier: float = 1.5,
        success_threshold: float = 0.99,
        unlearn_fraction: float = 0.2,
    ) -> None:
        super().__init__(victim)
        if not (initial_cost > 0 and cost_multiplier > 1 and 0 < success_threshold <= 1 and 0 < unlearn_fraction < 1):
            raise ConfigurationError(
                "Neural Cleanse needs initial_cost > 0, cost_multiplier > 1, success_threshold in (0, 1] and "
                f"unlearn_fraction in (0, 1); got {initial_cost}, {cost_multiplier}, {success_threshold}, "
                f"{unlearn_fraction}."
            )
        self.triggers = ReversedTriggers(victim.num_classes, *image_shape)
        self.register_buffer("costs", torch.full((victim.num_classes,), float(initial_cost)))
        self.register_buffer("detected_target", torch.tensor(-1))
        self.cost_multiplier = cost_multiplier
        self.success_threshold = success_threshold
        self.unlearn_fraction = unlearn_fraction

    def inversion_loss(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """The reverse-engineering objective on a batch split among the classes; also, per class,
        how many of its images went to it and how many it had (for the cost schedule)."""
        classes = torch.arange(len(images), device=images.device) % self.triggers.num_classes
        logits = self.victim(self.triggers.stamp(images, classes)).float()
        ce = F.cross_entropy(logits, classes)
        norms = self.triggers.mask_norms()
        # per class: CE_c + λ_c |m_c|_1, averaged over the classes (each has an equal share of the batch)
        sparsity = (self.costs * norms).mean()
        hits = torch.zeros_like(self.costs).index_add_(0, classes, (logits.argmax(1) == classes).float())
        counts = torch.bincount(classes, minlength=self.triggers.num_classes).float()
        return {"loss": ce + sparsity, "ce": ce, "mask_norm": norms.mean()}, hits, counts

    @torch.no_grad()
    def update_costs(self, hits: Tensor, counts: Tensor) -> None:
        """After a window: keep the triggers that succeeded and move each λ (see the module's docs)."""
        succeeded = hits >= self.success_threshold * counts.clamp_min(1)
        self.triggers.keep_best(succeeded)
        factor = torch.where(succeeded, self.cost_multiplier, self.cost_multiplier**-1.5)
        self.costs.mul_(factor.to(self.costs))

    @torch.no_grad()
    def detect(self, threshold: float = 2.0) -> int:
        """Flag the backdoor's target (or -1) from the triggers found, and remember it."""
        target = flagged_target(self.triggers.final_norms(), threshold)
        self.detected_target.fill_(target)
        return target

    def unlearning_loss(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """FT's loss on a batch whose first ``unlearn_fraction`` carries the flagged trigger."""
        target = int(self.detected_target)
        if target < 0:
            raise ConfigurationError("No trigger was flagged: there is nothing to unlearn.")
        count = round(self.unlearn_fraction * len(images))
        classes = torch.full((count,), target, device=images.device)
        stamped = torch.cat([self.triggers.stamp(images[:count], classes, final=True), images[count:]])
        return self.loss(stamped, labels)
