"""IAD, the input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): every image gets its own
trigger, made by a trigger generator and a mask generator that are trained with the classifier.

Unlike the other attacks, IAD is no fixed poisoned data set: the generators are trained together
with the victim by :class:`~lightning_defense.attacks.input_aware.lightning_model.InputAwareVictimTask`,
which poisons each training batch with :meth:`InputAware.poison_training_batch` and writes the
trained generators as a weights file next to the victim. The victim file's attack is then
``InputAware(generators_file=<that file>, generators_sha256=<its hash>)``, which poisons test images
with the trained generators, so defenses rebuild the poisoned test set from the victim file alone.

The networks, the blending and the losses follow the authors' code
(VinAIResearch/input-aware-backdoor-attack-release: ``networks/models.py``, ``train.py``,
``config.py``) and, for the network's blocks, BackdoorBox's ``core/attacks/IAD.py`` and
BackdoorBench's ``attack/inputaware.py``, which copy them. The official code feeds normalized
images to the generators and blends in normalized space with a normalized pattern; blending is
affine per channel, so the same poisoned image is ``x + m * (p - x)`` in [0, 1] pixels, which
is what is computed here (the generators normalize their input themselves, and the diversity
losses measure distances between normalized images and patterns, as the official ones do).

Its length: the paper's whole attack (two generators, their losses, the batch poisoning and the
generators' file) in one file, as for every method here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_defense.attacks.base import Attack, LabelMode
from lightning_defense.errors import ConfigurationError, InputNotFoundError
from lightning_defense.io.safetensors_files import read_safetensors, sha256, write_safetensors
from lightning_defense.victims.classifier import CIFAR10_MEAN, CIFAR10_STD

FORMAT = "lightning-defense-iad-generators/1"
# keeps the generators' outputs strictly inside (0, 1), and the diversity ratio finite (official EPSILON)
EPSILON = 1e-7


def conv_block(in_channels: int, out_channels: int, relu: bool = True) -> nn.Sequential:
    """The official ``Conv2dBlock``: 3x3 convolution, BatchNorm (momentum 0.05), ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels, momentum=0.05),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class EncoderDecoder(nn.Sequential):
    """The official ``Generator``: ``depth`` steps of two convolutions and a 2x2 max-pool, a middle
    convolution, ``depth`` steps of a bilinear 2x upsampling and two convolutions (the last one
    without ReLU), then ``tanh / 2 + 0.5`` into (0, 1). Channels double at each step down from
    ``width``; the official CIFAR-10/GTSRB network is ``width=32, depth=3`` (MNIST: 16, 2).
    Upsampling is bilinear as in BackdoorBench's copy of the official blocks (BackdoorBox's copy
    uses nearest). Image sides must be multiples of ``2 ** depth``.
    """

    def __init__(self, in_channels: int, out_channels: int, width: int = 32, depth: int = 3) -> None:
        if width < 1 or depth < 1:
            raise ConfigurationError(f"The generators' width and depth must be >= 1, got {width} and {depth}.")
        layers: list[nn.Module] = []
        channels = in_channels
        for step in range(depth):
            layers += [conv_block(channels, width * 2**step), conv_block(width * 2**step, width * 2**step)]
            layers.append(nn.MaxPool2d(2))
            channels = width * 2**step
        layers.append(conv_block(channels, channels))
        for step in range(depth):
            last = step == depth - 1
            following = out_channels if last else channels // 2
            layers += [nn.Upsample(scale_factor=2, mode="bilinear"), conv_block(channels, channels)]
            layers.append(conv_block(channels, following, relu=not last))
            channels = following
        super().__init__(*layers)
        self.depth = depth

    def forward(self, images: Tensor) -> Tensor:
        return torch.tanh(super().forward(images)) / (2 + EPSILON) + 0.5


def threshold(masks: Tensor) -> Tensor:
    """The official ``threshold``: a steep tanh that pushes the mask generator's output to 0 or 1."""
    return torch.tanh(masks * 20 - 10) / (2 + EPSILON) + 0.5


class InputAwareGenerators(nn.Module):
    """The trigger generator G (image -> pattern in [0, 1]) and the mask generator M (image ->
    one-channel mask in [0, 1]) of IAD, two :class:`EncoderDecoder` networks. The poisoned image
    is ``x + M(x) * (G(x) - x)``; both see the image normalized with ``mean``/``std``, as in the
    official code, where the data loader normalizes.
    """

    def __init__(
        self,
        channels: int = 3,
        width: int = 32,
        depth: int = 3,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        if len(mean) != channels or len(std) != channels:
            raise ConfigurationError(
                f"The generators take {channels}-channel images but mean/std have {len(mean)}/{len(std)} values."
            )
        self.channels, self.width, self.depth = channels, width, depth
        self.trigger_generator = EncoderDecoder(channels, channels, width, depth)
        self.mask_generator = EncoderDecoder(channels, 1, width, depth)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def settings(self) -> dict[str, Any]:
        """The init args, as the generators file records them."""
        return {
            "channels": self.channels,
            "width": self.width,
            "depth": self.depth,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
        }

    def check_image_size(self, image_size: Sequence[int]) -> None:
        step = 2**self.depth
        if any(side % step for side in image_size):
            raise ConfigurationError(
                f"The IAD generators halve the image {self.depth} times, so image sides must be multiples of "
                f"{step}, got {tuple(image_size)}: lower the generators' depth or resize the images."
            )

    def normalize(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std

    def patterns(self, images: Tensor) -> Tensor:
        return self.trigger_generator(self.normalize(images)).to(images.dtype)

    def masks(self, images: Tensor) -> Tensor:
        return threshold(self.mask_generator(self.normalize(images))).to(images.dtype)

    @staticmethod
    def blend(images: Tensor, patterns: Tensor, masks: Tensor) -> Tensor:
        """``images + masks * (patterns - images)``: a convex combination, so it stays in [0, 1]."""
        return images + masks * (patterns - images)

    def forward(self, images: Tensor) -> Tensor:
        """Each image with its own trigger."""
        return self.blend(images, self.patterns(images), self.masks(images))


def rms_distance(first: Tensor, second: Tensor) -> Tensor:
    """Per sample, the root of the mean squared difference (the official diversity distances).
    As a vector norm, whose gradient at 0 is 0 where that of a square root is NaN (two equal
    masks or patterns would otherwise break training)."""
    difference = (first.float() - second.float()).flatten(1)
    return torch.linalg.vector_norm(difference, dim=1) / difference.shape[1] ** 0.5


def diversity_loss(images: Tensor, other_images: Tensor, outputs: Tensor, other_outputs: Tensor) -> Tensor:
    """IAD's diversity loss over pairs (``images[i]``, ``other_images[i]``) with their generated
    ``outputs``: the mean of image distance / output distance. Two different images with the same
    trigger (or mask) make it large, so generators that minimize it give different images
    different triggers (input-aware, no universal trigger)."""
    if len(images) == 0:
        return images.new_zeros((), dtype=torch.float32)
    return (rms_distance(images, other_images) / (rms_distance(outputs, other_outputs) + EPSILON)).mean()


def mask_norm_loss(masks: Tensor, density: float) -> Tensor:
    """IAD's mask norm loss: the mean excess of the mask over ``density`` (the share of pixels the
    trigger may cover; official 0.032)."""
    return F.relu(masks.float() - density).mean()


def partners(images: Tensor) -> Tensor:
    """Another image for every image of the batch: the batch rolled by half its length. The
    official code draws them from a second, independently shuffled loader; with one loader,
    DDP shards and resume restore a single sampler, and the shuffled batch already pairs images
    at random (no image is paired with itself when the batch holds two or more)."""
    return images.roll(len(images) // 2, dims=0)


def mask_pretraining_losses(generators: InputAwareGenerators, images: Tensor, density: float) -> dict[str, Tensor]:
    """The losses of the mask generator's pretraining (official ``train_mask_step``): the norm
    loss toward ``density`` and the diversity loss between the masks of image pairs. The masks of
    the partners are the rolled masks: in one forward pass BatchNorm sees the same batch either way."""
    masks = generators.masks(images)
    normalized = generators.normalize(images)
    return {
        "norm": mask_norm_loss(masks, density),
        "diversity": diversity_loss(normalized, partners(normalized), masks, partners(masks)),
        "density": masks.detach().float().mean(),
    }


@dataclass
class PoisonedBatch:
    """A training batch of IAD: ``poisoned`` images with their own trigger and the attacker's
    labels first, then ``cross`` images with another image's trigger and their true labels, then
    the clean rest; ``diversity`` is the trigger generator's diversity loss on this batch."""

    images: Tensor
    labels: Tensor
    poisoned: int
    cross: int
    diversity: Tensor


def _load_generators(path: str, expected_sha256: str) -> InputAwareGenerators:
    """The generators file at ``path``, checked against ``expected_sha256`` before it is read."""
    file = Path(path)
    if not file.is_file():
        raise InputNotFoundError(
            f"The IAD generators file {path!r} does not exist. It is written next to the victim "
            "(generators.safetensors in the training run's folder); keep it beside the victim file (as "
            "generators.safetensors or <victim stem>.generators.safetensors), or set the attack's "
            "`generators_file` to its new path (e.g. the DefenseDataModule's `attack:` section, with the "
            "same generators_sha256)."
        )
    actual = sha256(file)
    if actual != expected_sha256:
        raise ConfigurationError(
            f"{path!r} is not the IAD generators file the victim was trained with: its SHA-256 is {actual}, "
            f"the victim file expects {expected_sha256}. It was altered or replaced; use the generators.safetensors "
            "of the victim's own training run."
        )
    tensors, metadata = read_safetensors(file)
    if metadata.get("format") != FORMAT:
        raise ConfigurationError(f"{path!r} is not an IAD generators file (format {metadata.get('format')!r}).")
    try:
        settings = json.loads(metadata["generators"])
        generators = InputAwareGenerators(
            int(settings["channels"]),
            int(settings["width"]),
            int(settings["depth"]),
            [float(v) for v in settings["mean"]],
            [float(v) for v in settings["std"]],
        )
        generators.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ConfigurationError(f"{path!r} holds no usable IAD generators ({err}): re-export them.") from err
    return generators.eval().requires_grad_(False)


def save_generators(path: str | Path, generators: InputAwareGenerators, trained_with: dict[str, Any]) -> Path:
    """Write the generators' weights (BatchNorm statistics included) with their settings and the
    recipe that trained them (``trained_with``, for the record), atomically."""
    metadata = {
        "format": FORMAT,
        "generators": json.dumps(generators.settings()),
        "trained_with": json.dumps(trained_with),
    }
    return write_safetensors(path, generators.state_dict(), metadata)


class InputAware(Attack):
    """IAD, the input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020).

    A trigger generator and a mask generator (:class:`InputAwareGenerators`) turn every image x
    into its own poisoned image ``x + M(x) * (G(x) - x)``. They are trained with the victim by
    ``InputAwareVictimTask``, which poisons training batches with
    :meth:`poison_training_batch`; this attack then poisons test images with the trained
    generators read from ``generators_file`` (checked against ``generators_sha256`` first: the path
    comes from a victim file, which is untrusted). Defaults follow the official ``config.py``:
    10% of each batch poisoned (``p_attack``), 10% cross samples (``p_cross``).

    Args:
        poison_rate: share of each training batch poisoned with its own trigger and relabelled
            (official ``p_attack``, rounded down per batch as there).
        cross_rate: share of each training batch that gets the trigger of *another* image and
            keeps its true label (official ``p_cross``; the issue's "cross ratio"). It teaches
            the classifier that a trigger works only on the image it was made for. Unlike WaNet's
            ``cross_ratio`` it is a share of the batch, not a count per poisoned image.
        generators_file: the generators file the trainer wrote (``generators.safetensors`` in the run
            folder); ``None`` before training, when only the batch and label rules are used.
        generators_sha256: the SHA-256 of that file, as the trainer recorded it.
    """

    def __init__(
        self,
        target: int = 0,
        poison_rate: float = 0.1,
        label_mode: LabelMode = "all_to_one",
        cross_rate: float = 0.1,
        generators_file: str | None = None,
        generators_sha256: str | None = None,
    ) -> None:
        # nothing here is drawn at random: the run's seed shuffles the batches that get poisoned
        super().__init__(target, poison_rate, label_mode)
        if not 0 <= cross_rate < 1 or poison_rate + cross_rate > 1:
            raise ConfigurationError(
                f"cross_rate must be in [0, 1) and poison_rate + cross_rate <= 1 (shares of each batch), got "
                f"cross_rate {cross_rate} with poison_rate {poison_rate}."
            )
        if (generators_file is None) != (generators_sha256 is None):
            raise ConfigurationError(
                "Give the IAD generators file with its SHA-256 (generators_file and generators_sha256 together; "
                "`sha256sum <file>` prints it): the file is checked before it is used."
            )
        self.cross_rate = cross_rate
        self.generators_file = generators_file
        self.generators_sha256 = generators_sha256
        self._loaded: InputAwareGenerators | None = None

    def locate_files(self, victim_file: str | Path) -> InputAware:
        """When the recorded generators file is gone, use ``<victim stem>.generators.safetensors``
        or a file of the recorded name beside the victim file (the SHA-256 check still applies)."""
        if self.generators_file is None or Path(self.generators_file).is_file():
            return self
        victim_file = Path(victim_file)
        for candidate in (
            victim_file.with_name(f"{victim_file.stem}.generators.safetensors"),
            victim_file.with_name(Path(self.generators_file).name),
        ):
            if candidate.is_file():
                self.generators_file, self._loaded = str(candidate), None
                break
        return self

    def load_generators(self) -> InputAwareGenerators:
        """The trained generators (eval mode, no gradients), read once and checked by SHA-256."""
        if self.generators_file is None or self.generators_sha256 is None:
            raise ConfigurationError(
                "InputAware poisons images with generators trained together with the victim, and `generators_file` "
                "is not set: use the victim.safetensors that InputAwareVictimTask writes at the end of "
                "training (its attack names the generators file), or set generators_file and generators_sha256 to "
                "that run's generators.safetensors."
            )
        if self._loaded is None:
            self._loaded = _load_generators(self.generators_file, self.generators_sha256)
        return self._loaded

    def check(self, image_size: tuple[int, int], num_classes: int) -> None:
        super().check(image_size, num_classes)
        if self.generators_file is not None:
            self.load_generators().check_image_size(image_size)

    @torch.no_grad()
    def apply(self, images: Tensor) -> Tensor:
        generators = self.load_generators().to(images.device)
        return generators(images)

    def poison_training_set(self, images: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
        raise ConfigurationError(
            "IAD poisons while the victim trains (its generators learn with the classifier), not a data set "
            "beforehand: train with `model: class_path: InputAwareVictimTask` and `data.init_args.attack: null` "
            "(see configs/victims/cifar10_iad.yaml)."
        )

    def batch_counts(self, batch_size: int) -> tuple[int, int]:
        """Poisoned and cross samples in a batch of ``batch_size``, rounded down (official)."""
        return int(self.poison_rate * batch_size), int(self.cross_rate * batch_size)

    def poison_training_batch(
        self,
        generators: InputAwareGenerators,
        images: Tensor,
        labels: Tensor,
        num_classes: int,
    ) -> PoisonedBatch:
        """One training batch of IAD (official ``create_bd`` and ``create_cross``), with the
        generators being trained: the first ``poison_rate`` of the (shuffled) batch gets its own
        trigger and the attacker's labels, the next ``cross_rate`` gets the trigger and mask of
        its partner (:func:`partners`) and keeps its labels, the rest stays clean. The diversity
        loss pairs poisoned image i with cross image i's partner, as the official code does (which
        needs equal rates; with unequal ones the smaller count of pairs is used).
        """
        poisoned, cross = self.batch_counts(len(images))
        sources = torch.cat([images[:poisoned], partners(images)[poisoned : poisoned + cross]])
        patterns, masks = generators.patterns(sources), generators.masks(sources)
        triggered = generators.blend(images[: poisoned + cross], patterns, masks)
        pairs = min(poisoned, cross)
        normalized = generators.normalize(sources)
        normalized_patterns = generators.normalize(patterns)
        diversity = diversity_loss(
            normalized[:pairs],
            normalized[poisoned : poisoned + pairs],
            normalized_patterns[:pairs],
            normalized_patterns[poisoned : poisoned + pairs],
        )
        return PoisonedBatch(
            images=torch.cat([triggered, images[poisoned + cross :]]),
            labels=torch.cat([self.poison_labels(labels[:poisoned], num_classes), labels[poisoned:]]),
            poisoned=poisoned,
            cross=cross,
            diversity=diversity,
        )
