"""Label-consistent backdoor: adversarially perturbed target-class images plus a corner trigger."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning_utilities.core.rank_zero import (  # what Lightning re-exports, without Lightning
    rank_zero_info,
    rank_zero_warn,
)
from rich.progress import track
from torch import Tensor, nn

from lightning_defense.attacks.adaptive_patch import corner_positions, paste_patch
from lightning_defense.attacks.base import Attack, LabelMode, scaled_side, to_float, to_uint8
from lightning_defense.errors import ConfigurationError, InputNotFoundError
from lightning_defense.io.shipped import resolve
from lightning_defense.victims.classifier import Classifier
from lightning_defense.victims.victim_file import load_victim, read_victim_metadata

CLEAN_CONFIG = "configs/victims/cifar10_clean.yaml"
SHIPPED_CLEAN = "checkpoints/cifar10_resnet20_clean.safetensors"


def pgd(model: nn.Module, images: Tensor, labels: Tensor, epsilon: float, step_size: float, steps: int) -> Tensor:
    """Untargeted L-infinity PGD on [0, 1] images: ``steps`` signed-gradient ascent steps on the
    model's cross-entropy for the true ``labels``, from the clean images (no random start), each
    followed by projection onto the ``epsilon`` ball and [0, 1]."""
    adversarial = images.clone()
    for _ in range(steps):
        adversarial.requires_grad_(True)
        loss = F.cross_entropy(model(adversarial), labels)
        (gradient,) = torch.autograd.grad(loss, adversarial)
        with torch.no_grad():
            adversarial = adversarial + step_size * gradient.sign()
            adversarial = torch.min(torch.max(adversarial, images - epsilon), images + epsilon).clamp_(0, 1)
    return adversarial.detach()


class LabelConsistent(Attack):
    """Label-consistent backdoor (Turner et al., "Label-consistent backdoor attacks", 2019), a
    clean-label attack: ``poison_rate`` of the target class's training images are first pushed
    away from their class by PGD against a *clean* model (so the network cannot classify them by
    their content and leans on the trigger), then stamped with the trigger; labels stay. Test
    images get the trigger only.

    The trigger is a black-and-white ``trigger_size`` square in each of the four corners, a
    checkerboard whose top-left pixel is black (for size 3 the 3x3 pattern of Turner et al.'s
    code and BackdoorBox's ``tests/test_LabelConsistent.py``), mirrored left-right in the left
    corners so horizontal flips keep it. Defaults follow BackdoorBox's LabelConsistent and issue 8:
    epsilon 8/255, step 1.5/255, 100 steps, no random start, a quarter of the target class.

    The clean model is read only when a training set is poisoned, so an attack rebuilt from a victim
    file (to build poisoned test sets) needs no clean model. PGD runs in float32, in batches, on
    ``device``; it takes minutes on a CPU, and runs again at every setup of the DataModule (a
    ``lightning test`` of the victim's config too: nothing is cached).

    Args:
        clean_model: victim file of a network trained without attack on the same data, e.g. the
            ``victim.safetensors`` that ``lightning fit --config configs/victims/cifar10_clean.yaml``
            writes in its run folder.
        epsilon: L-infinity radius of the perturbation, in [0, 1] pixel units.
        step_size: PGD step, in [0, 1] pixel units.
        steps: PGD steps.
        trigger_size: side of each corner square in pixels; ``None`` scales it with the image, 3
            pixels per 32 of the shorter side (the paper's 3x3 at 32).
        batch_size: images perturbed at once.
        device: where PGD runs; ``None`` uses the GPU when there is one.
    """

    clean_label = True

    def __init__(
        self,
        target: int = 0,
        poison_rate: float = 0.25,
        label_mode: LabelMode = "all_to_one",
        seed: int = 0,
        clean_model: str | None = None,
        epsilon: float = 8 / 255,
        step_size: float = 1.5 / 255,
        steps: int = 100,
        trigger_size: int | None = None,
        batch_size: int = 128,
        device: str | None = None,
    ) -> None:
        super().__init__(target, poison_rate, label_mode, seed)
        if not 0 < epsilon <= 1 or step_size <= 0:
            raise ConfigurationError(
                f"epsilon must be in (0, 1] and step_size > 0 ([0, 1] pixel units, e.g. 8/255 = 0.0314), got "
                f"{epsilon} and {step_size}."
            )
        if steps < 1 or (trigger_size is not None and trigger_size < 1) or batch_size < 1:
            raise ConfigurationError(
                f"steps, trigger_size and batch_size must be >= 1 (trigger_size may be null: scaled), got {steps}, "
                f"{trigger_size} and {batch_size}."
            )
        self.clean_model = clean_model
        self.epsilon = epsilon
        self.step_size = step_size
        self.steps = steps
        self.trigger_size = trigger_size
        self.batch_size = batch_size
        self.device = device

    def side(self, height: int, width: int) -> int:
        """The corner squares' side on images of this size."""
        return self.trigger_size if self.trigger_size is not None else scaled_side(3, height, width)

    @staticmethod
    def corner_patterns(side: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The four corners' checkerboards (top-left, top-right, bottom-left, bottom-right), CHW."""
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        checkerboard = ((rows + cols) % 2 == 0).float()
        checkerboard[0, 0] = 0
        right = checkerboard.expand(3, -1, -1)
        left = right.flip(-1)
        return left, right, left, right

    def _check_fits(self, height: int, width: int) -> None:
        side = self.side(height, width)
        if 2 * side > min(height, width):
            raise ConfigurationError(
                f"Four {side}x{side} corner triggers overlap in a {height}x{width} image: "
                f"use trigger_size <= {min(height, width) // 2}."
            )

    def check(self, image_size: tuple[int, int], num_classes: int) -> None:
        super().check(image_size, num_classes)
        self._check_fits(*image_size)

    def apply(self, images: Tensor) -> Tensor:
        """The trigger alone (test images; training images get it after PGD)."""
        height, width = images.shape[-2:]
        self._check_fits(height, width)
        out = images.clone()
        side = self.side(height, width)
        for pattern, position in zip(self.corner_patterns(side), corner_positions(side, height, width), strict=True):
            paste_patch(out, pattern, position)
        return out

    def load_clean_model(self, num_classes: int) -> Classifier:
        """The clean network PGD attacks, checked to be trained without attack."""
        if self.clean_model is None:
            raise ConfigurationError(
                "LabelConsistent perturbs its poisoned images against a clean model, and `clean_model` is not "
                f"set: use the shipped {SHIPPED_CLEAN}, or train one with `lightning fit --config {CLEAN_CONFIG}` "
                "and set `clean_model` to the victim.safetensors it writes in its run folder."
            )
        if not resolve(self.clean_model).is_file():
            raise InputNotFoundError(
                f"LabelConsistent's clean_model {self.clean_model!r} does not exist: train it with "
                f"`lightning fit --config {CLEAN_CONFIG}` (it writes victim.safetensors in its run folder), or "
                "point `clean_model` to that file."
            )
        with torch.random.fork_rng(devices=[]):  # building the network draws weights: keep the run's stream
            model = load_victim(self.clean_model, num_classes=num_classes)
        trained_with = model.metadata.attack
        if trained_with is not None:
            raise ConfigurationError(
                f"LabelConsistent's clean_model {self.clean_model!r} was trained with an attack "
                f"({trained_with.get('class_path')}); it must be a clean network: train one with "
                f"`lightning fit --config {CLEAN_CONFIG}`."
            )
        return model

    def check_training_data(self, data: dict[str, Any]) -> None:
        """The clean model must have learnt the victim's data set: PGD against a network of another
        data set (or image size) pushes images away from the wrong features. Another reserved split
        only warns: the perturbations still work, but the clean model may have trained on the images
        a defense later reserves, which the seeds' threat model does not allow."""
        if self.clean_model is None or not resolve(self.clean_model).is_file():
            return  # load_clean_model names the fix when the training set is poisoned
        metadata = read_victim_metadata(self.clean_model)
        trained_on = metadata.data if metadata is not None else None
        if trained_on is None:  # a bare state dict records no data
            return
        data_set = ("class_path", "num_classes", "image_size")
        if differs := [key for key in data_set if trained_on.get(key) != data.get(key)]:
            theirs = {key: trained_on.get(key) for key in differs}
            ours = {key: data.get(key) for key in differs}
            raise ConfigurationError(
                f"LabelConsistent's clean_model {self.clean_model!r} was trained on other data ({theirs}; "
                f"this victim's: {ours}). "
                f"Train the clean model on the victim's data (`lightning fit --config {CLEAN_CONFIG}` with the "
                "victim config's `data`) and point `clean_model` to its victim.safetensors."
            )
        split = ("reserved_fraction", "seed")
        if differs := [key for key in split if trained_on.get(key) != data.get(key)]:
            rank_zero_warn(
                f"LabelConsistent's clean_model {self.clean_model!r} was trained on another split of the data "
                f"({', '.join(f'{key} {trained_on.get(key)} vs {data.get(key)}' for key in differs)}): it may have "
                "seen the images the victim's reserved split keeps for defenses. Train it with the victim's "
                "reserved_fraction and seed to keep them unseen."
            )

    def perturb(self, images: Tensor, labels: Tensor, num_classes: int) -> Tensor:
        """PGD against the clean model on uint8 ``images``; float [0, 1] out."""
        model = self.load_clean_model(num_classes)
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.to(device)
        rank_zero_info(
            f"LabelConsistent: PGD ({self.steps} steps, epsilon {self.epsilon * 255:g}/255) on {len(images)} "
            f"target-class images against {self.clean_model}, on {device}"
        )
        batches = zip(images.split(self.batch_size), labels.split(self.batch_size), strict=True)
        out = []
        # outside any autocast and no_grad of the caller: PGD needs float32 input gradients
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            for batch, batch_labels in track(
                batches, total=-(-len(images) // self.batch_size), description="Label-consistent PGD"
            ):
                adversarial = pgd(
                    model,
                    to_float(batch).to(device),
                    batch_labels.to(device),
                    self.epsilon,
                    self.step_size,
                    self.steps,
                )
                out.append(adversarial.cpu())
        return torch.cat(out)

    def poison_training_set(self, images: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
        clean = images
        images, labels, poisoned = super().poison_training_set(images, labels, num_classes)
        if len(poisoned):
            # the base class stamped the trigger on the clean images; PGD must come first
            adversarial = self.perturb(clean[poisoned], labels[poisoned], num_classes)
            images[poisoned] = to_uint8(self.apply(adversarial))
        return images, labels, poisoned
