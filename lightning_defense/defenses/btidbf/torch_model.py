"""BTI-DBF (Xu et al., ICLR 2024): backdoor trigger inversion by decoupling benign features, in plain torch.

The victim is split at its feature layer, f = S_b ∘ S_a (:meth:`Classifier.features`, :meth:`Classifier.head`).
Each round of the defense:

1. **Decouple benign features**: a soft mask m over every element of S_a's output learns which
   features the victim needs to classify the defender's labeled images (m keeps them, 1 − m
   must not be enough).
2. **Invert the backdoor**: a generator G (an image-to-image UNet) learns small input changes that
   move the features outside m (the backdoor's) as far as possible while keeping the benign
   features; the most frequent prediction on G(x) is the detected target class.
3. **Remove it**, either (P) a purifier Ĝ (the same UNet) learns to map G(x) and x back to
   images the victim classifies correctly, the defended model being f(Ĝ(x)), or (U) a copy of
   the victim is fine-tuned to classify G(x) correctly (unlearning).

From the second round on, G attacks the defended model of the previous round (f∘Ĝ, or the repaired
copy) and is also pushed toward the detected target, so each round finds what the last one missed.
Distances in input space are mean squared errors in the victim's normalized input space, as in the
official code, so the bounds keep their published values.

Not in the paper: with ``replay_generators`` step 3 also sees the earlier rounds' generators. Step 3
otherwise learns only against the newest G, which from round 2 on looks for what the last defense
missed, so a purifier that removed the trigger in one round can forget it in the next
(Blended with the paper's schedule: docs/results/btidbf_cifar10_cpu.md, row ``blended_p_paper``).

Its length: the paper's three steps and both defense variants in one file, as for every method
here (the schedule is in :mod:`.schedule`).
"""

from __future__ import annotations

import copy
import math
from abc import abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_defense.defenses.btidbf.schedule import Phase
from lightning_defense.defenses.components import TransformNet
from lightning_defense.errors import ConfigurationError, check_non_negative
from lightning_defense.victims.classifier import Classifier


class FeatureMask(nn.Module):
    """m = tanh(w) / 2 + 0.5, one weight per element of S_a's output, drawn at random (the factor is
    a hair below 1/2, so that m stays strictly inside (0, 1) even where tanh saturates)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape))
        self.reset()

    def reset(self) -> None:
        with torch.no_grad():
            self.weight.normal_()

    def forward(self) -> Tensor:
        return 0.5 + (0.5 - 1e-6) * torch.tanh(self.weight)


class Purified(nn.Module):
    """f(Ĝ(x)): the victim behind the purifier, split like a classifier."""

    def __init__(self, victim: Classifier, purifier: TransformNet) -> None:
        super().__init__()
        self.victim, self.purifier = victim, purifier

    def normalize(self, images: Tensor) -> Tensor:
        return self.victim.normalize(images)

    def features(self, images: Tensor) -> Tensor:
        return self.victim.features(self.purifier(images))

    def head(self, features: Tensor) -> Tensor:
        return self.victim.head(features)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


SplitModel = Classifier | Purified


def input_distance(model: SplitModel, images: Tensor, other: Tensor) -> Tensor:
    """Mean squared distance in the victim's normalized input space."""
    return F.mse_loss(model.normalize(other).float(), model.normalize(images).float())


def pretrain_loss(model: SplitModel, network: TransformNet, images: Tensor, input_bound: float) -> dict[str, Tensor]:
    """The official code's start for G and the purifier: a plain UNet N trained to reproduce x
    loosely while keeping what the victim sees: CE(f(N(x)), softmax f(x)) + ‖S_a(x) − S_a(N(x))‖²
    + w·‖x − N(x)‖², w = 100 beyond ``input_bound`` (pulls a far output back) and 0.01 within it
    (leaves N free to drop what the victim's prediction does not need, a blended trigger among it).
    The official prediction term is the cross-entropy between the two softmaxes, with the clean
    one as logits; ours is the soft-label cross-entropy toward f(x), the same intent."""
    reconstructed = network(images)
    with torch.no_grad():
        clean_features = model.features(images).float()
        clean_probabilities = model.head(clean_features).float().softmax(dim=1)
    features = model.features(reconstructed)
    parts = {
        "prediction_ce": F.cross_entropy(model.head(features).float(), clean_probabilities),
        "feature_distance": F.mse_loss(features.float(), clean_features),
        "input_distance": input_distance(model, images, reconstructed),
    }
    input_weight = torch.where(parts["input_distance"] > input_bound, 100.0, 0.01)  # no host sync
    loss = parts["prediction_ce"] + parts["feature_distance"] + input_weight * parts["input_distance"]
    return {"loss": loss, **parts}


def decoupling_loss(model: SplitModel, mask: FeatureMask, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Step 1: CE(S_b(S_a(x) ⊙ m), y) − CE(S_b(S_a(x) ⊙ (1 − m)), y)."""
    with torch.no_grad():
        features = model.features(images)
    m = mask()
    kept = F.cross_entropy(model.head(features * m).float(), labels)
    left = F.cross_entropy(model.head(features * (1 - m)).float(), labels)
    return {"loss": kept - left, "benign_ce": kept, "complement_ce": left}


def generator_loss(
    model: SplitModel,
    mask: Tensor,
    generator: TransformNet,
    images: Tensor,
    input_bound: float,
    feature_bound: float,
    benign_weight: float,
    target: int | None = None,
) -> dict[str, Tensor]:
    """Step 2: while G(x) stays within ``input_bound`` of x and its benign features within
    ``feature_bound``, push the backdoor features (1 − m) away and keep the benign ones (m);
    outside the bounds the loss is the input distance alone, pulling G back. ``target`` (from the
    second round) adds the cross-entropy of the model's prediction on G(x) toward it."""
    generated = generator(images)
    with torch.no_grad():
        clean = model.features(images).float()
    features = model.features(generated)
    moved = features.float() - clean
    parts = {
        "input_distance": input_distance(model, images, generated),
        "benign_distance": (mask * moved).pow(2).mean(),
        "backdoor_distance": ((1 - mask) * moved).pow(2).mean(),
    }
    # a tensor condition, not Python's `or`: no host sync per step (the loss is the same)
    outside = (parts["input_distance"] > input_bound) | (parts["benign_distance"] > feature_bound)
    inside_loss = -parts["backdoor_distance"] + benign_weight * parts["benign_distance"]
    loss = torch.where(outside, parts["input_distance"], inside_loss)
    if target is not None:
        targets = torch.full((len(images),), target, device=images.device)
        parts["target_ce"] = F.cross_entropy(model.head(features).float(), targets)
        loss = loss + parts["target_ce"]
    return {"loss": loss, **parts, "outside_bounds": outside.float()}


class TriggerInversion(nn.Module):
    """Steps 1 and 2 and the target detection, shared by purification and unlearning; subclasses
    add step 3 (:meth:`defense_loss`) and say what the defended model is (:meth:`defended`).

    Args:
        victim: the frozen classifier f.
        generator: G, a :class:`TransformNet`: residual with a random last layer, it starts near
            the identity (at it, its loss would have no gradient) and the input bound pulls it
            inside; plain, it is pretrained first (:meth:`pretrain_loss`), as the official code does.
        input_bound, feature_bound: the bounds of :func:`generator_loss` (official: 0.3 and 3).
        benign_weight: weight of the benign-feature distance in G's loss (official: 0.01).
        vote_noise: standard deviation of the noise added to x before the target vote, in the
            victim's normalized input space (official: 0.03).
        poison_fraction: share of each batch replaced by G(x) in step 3 (official: 0.1).
        image_size: of the victim's inputs, which sets the shape of the feature mask; default:
            the size the victim records.
        replay_generators: step 3 draws each image's generator from this round's G and frozen
            copies of the earlier rounds' (:meth:`remember_generator`), not from G alone.
        pretrain_input_bound: the input distance beyond which pretraining pulls the UNet back
            hard (official: 0.1).
        pretrain_generator: pretraining trains G (official); off, it trains the defense's own UNet
            (the purifier of (P)) and G stays residual.
    """

    def __init__(
        self,
        victim: Classifier,
        generator: TransformNet,
        input_bound: float = 0.3,
        feature_bound: float = 3.0,
        benign_weight: float = 0.01,
        vote_noise: float = 0.03,
        poison_fraction: float = 0.1,
        image_size: tuple[int, int] | None = None,
        replay_generators: bool = False,
        pretrain_input_bound: float = 0.1,
        pretrain_generator: bool = True,
    ) -> None:
        super().__init__()
        if not 0 < poison_fraction <= 1:
            raise ConfigurationError(f"poison_fraction must be in (0, 1], got {poison_fraction}.")
        # a negative distance bound puts every G(x) outside it: G only learns to copy x, silently
        check_non_negative(
            "BTI-DBF",
            "The bounds are distances (official: input_bound 0.3, feature_bound 3, pretrain_input_bound 0.1).",
            input_bound=input_bound,
            feature_bound=feature_bound,
            pretrain_input_bound=pretrain_input_bound,
            benign_weight=benign_weight,
            vote_noise=vote_noise,
        )
        self.victim = victim.freeze()
        self.generator = generator
        size = image_size or victim.image_size or (32, 32)  # a victim of unknown size: CIFAR's
        #: the input size the feature mask was shaped for
        self.image_size = tuple(size)
        with torch.no_grad():
            shape = victim.features(torch.zeros(1, 3, *size)).shape[1:]
        self.feature_mask = FeatureMask(tuple(shape))
        self.input_bound, self.feature_bound = input_bound, feature_bound
        self.benign_weight = benign_weight
        self.vote_noise = vote_noise
        self.poison_fraction = poison_fraction
        self.replay_generators = replay_generators
        self.pretrain_input_bound = pretrain_input_bound
        self.pretrain_generator = pretrain_generator
        self.earlier_generators = nn.ModuleList()
        # -1 until the first detection; a buffer, so it is saved and restored with the weights
        self.register_buffer("detected_target", torch.tensor(-1))

    @abstractmethod
    def defended(self) -> SplitModel:
        """The defended model so far, which steps 1 and 2 of the next round attack."""

    @abstractmethod
    def defense_loss(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Step 3 on a labeled batch."""

    def forward(self, images: Tensor) -> Tensor:
        return self.defended()(images)

    def pretrained_network(self) -> nn.Module:
        """The UNet pretraining trains: G, or without ``pretrain_generator`` the defense's own."""
        if self.pretrain_generator:
            return self.generator
        raise ConfigurationError(
            f"{type(self).__name__} has no UNet but G to pretrain: set pretrain_generator to true, or "
            "pretrain_epochs to 0."
        )

    def pretrain_loss(self, images: Tensor) -> dict[str, Tensor]:
        """Pretraining against the victim itself (no defense exists yet)."""
        return pretrain_loss(self.victim, self.pretrained_network(), images, self.pretrain_input_bound)

    def end_pretraining(self) -> None:
        """After pretraining: parts that start from the pretrained G take its weights."""

    def attacked(self, round_index: int) -> SplitModel:
        """The model steps 1 and 2 of a round work on: the victim in round 1 (before any step 3,
        the defended model is the victim, whatever a pretrained purifier would make of it; the
        official code's round 1 uses the victim too), the defended model so far after that."""
        return self.victim if round_index == 0 else self.defended()

    def mask_loss(self, images: Tensor, labels: Tensor, round_index: int) -> dict[str, Tensor]:
        return decoupling_loss(self.attacked(round_index), self.feature_mask, images, labels)

    def generator_loss(self, images: Tensor, round_index: int) -> dict[str, Tensor]:
        target = int(self.detected_target) if round_index > 0 and self.detected_target >= 0 else None
        with torch.no_grad():
            mask = self.feature_mask()
        return generator_loss(
            self.attacked(round_index),
            mask,
            self.generator,
            images,
            self.input_bound,
            self.feature_bound,
            self.benign_weight,
            target,
        )

    def phase_loss(self, phase: Phase, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The loss of a training phase (every phase but the vote, which trains nothing)."""
        if phase.name == "pretrain":
            return self.pretrain_loss(images)
        if phase.name == "mask":
            return self.mask_loss(images, labels, phase.round)
        if phase.name == "generator":
            return self.generator_loss(images, phase.round)
        return self.defense_loss(images, labels)

    @torch.no_grad()
    def target_votes(self, images: Tensor, round_index: int) -> Tensor:
        """How often each class is predicted on G(x + noise): the detected target is the top one.
        The noisy images are clamped to [0, 1] (contract 1; the official code does not clamp)."""
        model = self.attacked(round_index)
        std = self.victim.std.to(images.device)
        noisy = (images + self.vote_noise * std * torch.randn_like(images)).clamp(0, 1)
        predictions = model(self.generator(noisy)).argmax(dim=1)
        return torch.bincount(predictions, minlength=self.victim.num_classes)

    def remember_generator(self) -> None:
        """Keep a frozen copy of G as it is now, for the later rounds' step 3."""
        self.earlier_generators.append(copy.deepcopy(self.generator).eval().requires_grad_(False))

    @torch.no_grad()
    def generate(self, images: Tensor) -> Tensor:
        """G(x) for step 3 (no gradient); with ``replay_generators`` each image gets a generator
        drawn uniformly from the earlier rounds' copies and this round's G."""
        generators = [*self.earlier_generators, self.generator] if self.replay_generators else [self.generator]
        if len(generators) == 1:
            return self.generator(images).to(images.dtype)
        choice = torch.randint(len(generators), (len(images),), device=images.device)
        generated = torch.empty_like(images)
        for index, generator in enumerate(generators):
            chosen = choice == index
            if chosen.any():
                generated[chosen] = generator(images[chosen]).to(images.dtype)
        return generated

    def mixed(self, images: Tensor, generated: Tensor | None = None) -> Tensor:
        """The batch with a random ``poison_fraction`` of it (at least one image) replaced by G(x),
        taken from ``generated`` when the caller has it, else run on that share only (no gradient)."""
        count = min(len(images), math.ceil(self.poison_fraction * len(images)))
        index = torch.randperm(len(images), device=images.device)[:count]
        mixed = images.clone()
        share = generated[index] if generated is not None else self.generate(images[index])
        mixed[index] = share.to(images.dtype)
        return mixed


class Purification(TriggerInversion):
    """BTI-DBF (P): step 3 trains a purifier Ĝ; the defended model is f(Ĝ(x)).

    Its loss is, for the generated batch G(x) and for the benign batch (``poison_fraction`` of it
    replaced by G(x)): CE(f(Ĝ(·)), y) + ‖S_a(x) − S_a(Ĝ(·))‖² + w·‖x − Ĝ(·)‖² (mean squared
    errors, input distance in the victim's normalized space), w = ``input_weight``, or 100 where
    the distance exceeds ``input_bound_purifier``.

    Args:
        generated_batch: train on the all-G(x) batch too (the paper's two terms); the official
            code trains on the benign batch alone.
        purifier_noise: standard deviation of Gaussian noise added to Ĝ's inputs in step 3, in
            the victim's normalized space (official: 0.03; clamped to [0, 1], contract 1).
        input_bound_purifier: beyond it the input distance weighs 100 (official: 0.05); ``None``:
            no bound.
    """

    def __init__(
        self,
        victim: Classifier,
        generator: TransformNet,
        purifier: TransformNet,
        input_weight: float = 1.0,
        generated_batch: bool = True,
        purifier_noise: float = 0.0,
        input_bound_purifier: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(victim, generator, **kwargs)
        check_non_negative(
            "BTI-DBF (P)",
            input_weight=input_weight,
            purifier_noise=purifier_noise,
            input_bound_purifier=input_bound_purifier,
        )
        self.purifier = purifier
        self.input_weight = input_weight
        self.generated_batch = generated_batch
        self.purifier_noise = purifier_noise
        self.input_bound_purifier = input_bound_purifier

    def defended(self) -> Purified:
        return Purified(self.victim, self.purifier)  # a view, built per call: no second copy in the state dict

    def pretrained_network(self) -> nn.Module:
        return self.generator if self.pretrain_generator else self.purifier

    def end_pretraining(self) -> None:
        if self.pretrain_generator:
            self.purifier.load_state_dict(self.generator.state_dict())  # both start there (official)

    def defense_loss(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            clean_features = self.victim.features(images).float()
        if self.generated_batch:
            generated = self.generate(images)
            batches = {"poisoned": generated, "benign": self.mixed(images, generated)}
        else:
            batches = {"benign": self.mixed(images)}
        parts, loss = {}, 0.0
        for name, inputs in batches.items():
            if self.purifier_noise:
                std = self.victim.std.to(inputs.device)
                inputs = (inputs + self.purifier_noise * std * torch.randn_like(inputs)).clamp(0, 1)
            purified = self.purifier(inputs)
            features = self.victim.features(purified)
            parts[f"{name}_ce"] = F.cross_entropy(self.victim.head(features).float(), labels)
            parts[f"{name}_feature_distance"] = F.mse_loss(features.float(), clean_features)
            parts[f"{name}_input_distance"] = distance = input_distance(self.victim, images, purified)
            weight = self.input_weight
            if self.input_bound_purifier is not None:  # a tensor condition: no host sync per step
                weight = torch.where(distance > self.input_bound_purifier, 100.0, self.input_weight)
            loss = loss + parts[f"{name}_ce"] + parts[f"{name}_feature_distance"] + weight * distance
        return {"loss": loss, **parts}


class Unlearning(TriggerInversion):
    """BTI-DBF (U): step 3 fine-tunes a copy of the victim (the victim itself stays untouched) on
    batches where ``poison_fraction`` of the images are G(x) with their true labels, plus the
    distance between the copy's features of the clean and of the mixed batch. The defended model
    is the repaired copy."""

    def __init__(self, victim: Classifier, generator: TransformNet, **kwargs) -> None:
        super().__init__(victim, generator, **kwargs)
        self.repaired = self.victim.trainable_copy()

    def defended(self) -> Classifier:
        return self.repaired

    def defense_loss(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        mixed = self.mixed(images)
        clean_features = self.repaired.features(images)
        mixed_features = self.repaired.features(mixed)
        parts = {
            "ce": F.cross_entropy(self.repaired.head(mixed_features).float(), labels),
            "feature_distance": F.mse_loss(mixed_features.float(), clean_features.float()),
        }
        return {"loss": parts["ce"] + parts["feature_distance"], **parts}
