"""REFINE (Chen et al., ICLR 2025): model reprogramming against backdoors, in plain torch.

A frozen, possibly backdoored victim F is defended without touching its weights: an input
transformation network T (a UNet) rewrites every image, and a fixed label permutation M (a
derangement) remaps the victim's outputs, so the defended model is M(F(T(x))). T is trained on
unlabeled data so that M(F(T(x))) predicts what F predicts on the clean, untransformed x, while
the rewriting destroys triggers. The loss is a classification term on the victim's pseudo-labels
plus a supervised contrastive term on T's outputs that pulls images of one pseudo-class together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_defense.defenses.components import LabelPermutation, ReprogrammedClassifier, TransformNet
from lightning_defense.errors import ConfigurationError, check_non_negative
from lightning_defense.victims.classifier import Classifier

ClassificationLoss = Literal["ce", "bce", "soft"]


def supervised_contrastive_loss(features: Tensor, labels: Tensor, temperature: float = 0.07) -> Tensor:
    """Supervised contrastive loss (Khosla et al., 2020) of L2-normalized ``features``.

    Each anchor's positives are the other samples with the same label; the denominator runs over
    every other sample. Anchors without positives are left out of the mean.
    """
    features = F.normalize(features.flatten(1).float(), dim=1)
    similarity = features @ features.T / temperature
    self_mask = torch.eye(len(features), dtype=torch.bool, device=features.device)
    similarity = similarity.masked_fill(self_mask, float("-inf"))
    log_prob = similarity - similarity.logsumexp(dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(dim=1)
    has_positive = counts > 0
    if not has_positive.any():
        return features.sum() * 0  # keeps the graph; nothing to contrast in this batch
    mean_log_prob = log_prob.masked_fill(~positives, 0).sum(dim=1)[has_positive] / counts[has_positive]
    return -mean_log_prob.mean()


class RefineModel(ReprogrammedClassifier):
    """The defended model M(F(T(x))) and REFINE's training loss.

    Args:
        victim: the frozen classifier F (taking [0, 1] pixels).
        transform_net: T.
        label_permutation: M.
        classification_loss: ``ce`` (the paper) or ``bce`` (the official code: binary
            cross-entropy between the permuted softmax and the one-hot pseudo-label), both on
            the hard pseudo-label; or ``soft``: soft pseudo-labels, the KL divergence to the
            victim's whole softened output distribution (Hinton et al.'s knowledge
            distillation), which tells T how the victim ranks every class, not only its top one.
        contrastive_weight: lambda of the supervised contrastive term; 0 disables it.
        temperature: tau of the supervised contrastive term.
        soft_label_temperature: softens both distributions of the ``soft`` loss.
        encoder_head_weight: weight of an extra training signal, not in the paper: the same
            classification loss between T's encoder head (see :class:`TransformNet`) and the
            victim's answer, so T's encoder learns to tell the classes apart directly instead of
            only through its decoder and the victim. Needs a T with an encoder head; 0 disables.
        labelled_augmentations: applied in order *before* the victim labels the batch, so the
            victim's answer on the augmented image is the target (not in the paper): for
            augmentations that change what an image shows, such as
            :class:`~lightning_defense.data.augmentation.ImageMixup`, which give a small
            auxiliary set new images and targets every epoch. A caller that passes
            ``victim_logits`` to :meth:`loss` applies them first.
        augmentation: training augmentation of T's inputs, applied *after* the victim labelled
            the images as they are: an augmentation can fire a backdoor (the recipe's
            RandomResizedCrop resamples, i.e. warps, and the WaNet victim answers its target on
            far more augmented CIFAR-10 training images than unaugmented ones, measured by
            benchmarks/augmentation_fires_backdoor.py), and labels taken after it would teach T
            the backdoor. ``None`` trains on the images as given.
        corruptions: applied in order after ``augmentation``, still against the labels of the
            clean images (not in the paper): trigger-agnostic corruptions such as
            :class:`~lightning_defense.data.augmentation.RandomPatches` ask T to answer as if they
            were not there, i.e. to rewrite trigger-shaped content instead of copying it.
        consistency_weight: weight of a term (not in the paper) asking T to rewrite a corrupted
            image as it rewrites the uncorrupted one: the mean squared difference between
            T(corrupted) and T(uncorrupted), the latter a target without gradient. The
            classification term alone is satisfied when a corruption leaves the victim's answer
            as it is (almost every random patch does), so T may copy it through; this term asks
            T to erase it wherever it is. Needs ``corruptions``; 0 disables.
    """

    def __init__(
        self,
        victim: Classifier,
        transform_net: TransformNet,
        label_permutation: LabelPermutation,
        classification_loss: ClassificationLoss = "ce",
        contrastive_weight: float = 0.1,
        temperature: float = 0.07,
        soft_label_temperature: float = 4.0,
        encoder_head_weight: float = 0.0,
        labelled_augmentations: Sequence[nn.Module] = (),
        augmentation: nn.Module | None = None,
        corruptions: Sequence[nn.Module] = (),
        consistency_weight: float = 0.0,
    ) -> None:
        super().__init__(victim, transform_net, label_permutation)
        if classification_loss not in ("ce", "bce", "soft"):
            raise ConfigurationError(f"classification_loss must be 'ce', 'bce' or 'soft', got {classification_loss!r}.")
        for name, value in (("soft_label_temperature", soft_label_temperature), ("temperature", temperature)):
            if not value > 0:
                raise ConfigurationError(f"{name} must be > 0, got {value}: it divides the logits or similarities.")
        weights = {"contrastive_weight": contrastive_weight, "consistency_weight": consistency_weight}
        check_non_negative("REFINE", "0 turns the term off.", **weights)
        if consistency_weight > 0 and not corruptions:
            raise ConfigurationError(
                "consistency_weight > 0 compares T on corrupted and on clean images: give corruptions."
            )
        if encoder_head_weight < 0:
            raise ConfigurationError(f"encoder_head_weight must be >= 0, got {encoder_head_weight}.")
        has_head = isinstance(transform_net, TransformNet) and transform_net.unet.classification_head is not None
        if has_head != (encoder_head_weight > 0):  # an unused head has no gradient, and plain DDP fails on it
            raise ConfigurationError(
                "T has an encoder head exactly when encoder_head_weight > 0: set the TransformNet's "
                "encoder_head_classes to the class count with a positive weight, and to 0 without."
            )
        self.classification_loss = classification_loss
        self.contrastive_weight = contrastive_weight
        self.temperature = temperature
        self.soft_label_temperature = soft_label_temperature
        self.encoder_head_weight = encoder_head_weight
        self.labelled_augmentations = nn.Sequential(*labelled_augmentations)
        self.augmentation = augmentation
        self.corruptions = nn.Sequential(*corruptions)
        self.consistency_weight = consistency_weight

    @torch.no_grad()
    def victim_logits(self, images: Tensor) -> Tensor:
        """F(x) on the untransformed images: the targets (pseudo-label ȳ = argmax); ground truth is
        never used."""
        return self.victim(images)

    def loss(
        self,
        images: Tensor,
        victim_logits: Tensor | None = None,
        classifier: nn.Module | None = None,
        gather: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """REFINE's loss on a batch; returns the total and its parts.

        ``images`` are the auxiliary images as they are (the augmentation comes after labelling).
        ``victim_logits`` are F's outputs on ``images`` when the caller has them (any logits that
        give the victim's probabilities will do, e.g. their log; ``images`` have then been through
        ``labelled_augmentations`` already, else they are applied here before labelling).
        ``classifier`` stands in for the victim in the loss (black-box mode trains T against a
        surrogate, since a black-box victim gives no gradients). ``gather`` concatenates a tensor
        over all processes, with gradients, so that under data parallelism SupCon contrasts the
        global batch as on one device (every
        process computes the same global term; the gradient averaging of DDP then yields the
        global term's gradient); the other terms are means over the local batch.
        """
        if victim_logits is None:
            images = self.labelled_augmentations(images)
            victim_logits = self.victim_logits(images)
        pseudo_labels = victim_logits.argmax(dim=1)
        victim_logits = victim_logits.float()
        if self.augmentation is not None:
            images = self.augmentation(images)
        corrupted = self.corruptions(images)
        transformed, encoder_logits = self.transform_net.forward_with_head(corrupted)
        logits = self.label_permutation((classifier or self.victim)(transformed)).float()
        parts = {"classification": self.classification(logits, victim_logits, pseudo_labels)}
        total = parts["classification"]
        if self.encoder_head_weight > 0:
            parts["encoder"] = self.classification(encoder_logits.float(), victim_logits, pseudo_labels)
            total = total + self.encoder_head_weight * parts["encoder"]
        if self.contrastive_weight > 0:
            features, labels = transformed, pseudo_labels
            if gather is not None:
                features, labels = gather(features), gather(labels)
            parts["contrastive"] = supervised_contrastive_loss(features, labels, self.temperature)
            total = total + self.contrastive_weight * parts["contrastive"]
        if self.consistency_weight > 0:
            with torch.no_grad():
                uncorrupted = self.transform_net(images)
            parts["consistency"] = F.mse_loss(transformed.float(), uncorrupted.float())
            total = total + self.consistency_weight * parts["consistency"]
        return {"loss": total, **parts}

    def classification(self, logits: Tensor, victim_logits: Tensor, pseudo_labels: Tensor) -> Tensor:
        """L_cls between the defended model's (permuted) logits and the victim's answer."""
        if self.classification_loss == "ce":
            return F.cross_entropy(logits, pseudo_labels)
        if self.classification_loss == "soft":
            t = self.soft_label_temperature
            target = (victim_logits / t).softmax(dim=1)
            # t^2 keeps the gradient's scale independent of t (Hinton et al., 2015)
            return F.kl_div((logits / t).log_softmax(dim=1), target, reduction="batchmean") * t * t
        target = F.one_hot(pseudo_labels, logits.shape[1]).float()
        # autocast refuses binary_cross_entropy (unsafe in half precision): run it in float32
        with torch.autocast(logits.device.type, enabled=False):
            return F.binary_cross_entropy(logits.softmax(dim=1), target)


def surrogate_loss(surrogate_logits: Tensor, victim_probabilities: Tensor) -> Tensor:
    """REFINE's black-box mode (paper, appendix E): mean squared error between the surrogate's
    and the victim's softmax outputs."""
    return F.mse_loss(surrogate_logits.float().softmax(dim=1), victim_probabilities.float())
