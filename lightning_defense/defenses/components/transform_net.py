"""The input transformations of the defenses that rewrite their input: an image-to-image UNet from
segmentation-models-pytorch (REFINE's T, BTI-DBF's backdoor generator and purifier), and T-MR's
learned border (REFINE paper, appendix D.6)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_defense.errors import ConfigurationError

OutputActivation = Literal["sigmoid", "clamp"]


class TransformNet(nn.Module):
    """An image-to-image UNet (smp), image in [0, 1] to image in [0, 1]: REFINE's T, BTI-DBF's generators.

    Encoder stages deeper than ``encoder_depth`` are removed: smp keeps them, their parameters get
    no gradient, and DDP fails on unused parameters.

    Args:
        encoder_name: any smp encoder (``resnet18``, ``resnet34``, ``vgg11_bn``...).
        encoder_depth: number of down-sampling stages (3 to 5); 32x32 images allow 5.
        decoder_channels: one width per stage, deepest first.
        output_activation: ``sigmoid`` keeps gradients for pixels pushed outside [0, 1];
            ``clamp`` is the official code's choice and zeroes them.
        residual: the UNet predicts a change to the input (in logit space for ``sigmoid``), so
            an untrained T starts at (or near) the identity instead of a random image.
        identity_init: with ``residual``, zero the last layer so that T starts exactly at the
            identity. ``False`` keeps smp's random last layer: a small random change, for losses
            whose gradient vanishes at the identity (BTI-DBF's backdoor generator).
        encoder_head_classes: > 0 adds smp's classification head (average pooling, linear) on
            the deepest encoder stage, for REFINE's encoder loss. It only helps training:
            the defended model never uses it and :meth:`inference_state_dict` leaves it out.
    """

    def __init__(
        self,
        encoder_name: str = "resnet18",
        encoder_depth: int = 4,
        decoder_channels: Sequence[int] = (256, 128, 64, 32),
        in_channels: int = 3,
        output_activation: OutputActivation = "sigmoid",
        residual: bool = False,
        encoder_head_classes: int = 0,
        identity_init: bool = True,
    ) -> None:
        super().__init__()
        if not 1 <= encoder_depth <= 5:
            raise ConfigurationError(f"encoder_depth must be 1 to 5 down-sampling stages, got {encoder_depth}.")
        if len(decoder_channels) != encoder_depth:
            raise ConfigurationError(
                f"decoder_channels has {len(decoder_channels)} entries but encoder_depth is "
                f"{encoder_depth}: give one decoder width per encoder stage."
            )
        if output_activation not in ("sigmoid", "clamp"):
            raise ConfigurationError(f"output_activation must be 'sigmoid' or 'clamp', got {output_activation!r}.")
        self.output_activation = output_activation
        self.residual = residual
        head = {"classes": encoder_head_classes, "pooling": "avg", "dropout": None} if encoder_head_classes else None
        self.unet = smp.Unet(
            encoder_name=encoder_name,
            encoder_weights=None,  # nothing can be downloaded; T learns from scratch
            encoder_depth=encoder_depth,
            decoder_channels=list(decoder_channels),
            in_channels=in_channels,
            classes=in_channels,
            aux_params=head,
        )
        self._remove_unused_stages()
        if residual and identity_init:  # a zero change: T is exactly the identity before training
            for parameter in self.unet.segmentation_head.parameters():
                nn.init.zeros_(parameter)

    def _remove_unused_stages(self) -> None:
        """Replace encoder stages that a forward pass never calls (found by one probe with forward
        hooks, which needs no autograd: T can be built under ``torch.inference_mode`` too)."""
        encoder, called = self.unet.encoder, set()
        hooks = [  # on every sub-module: some encoders (VGG) run slices of a stage, never the stage itself
            module.register_forward_hook(lambda *_, name=name: called.add(name))
            for name, child in encoder.named_children()
            for module in child.modules()
        ]
        self.unet.train(False)  # eval: the probe must not touch BatchNorm statistics
        with torch.no_grad():
            self.unet(torch.zeros(1, encoder._in_channels, 32, 32))
        self.unet.train(True)
        for hook in hooks:
            hook.remove()
        for name, child in list(encoder.named_children()):
            if name not in called and any(True for _ in child.parameters()):
                setattr(encoder, name, nn.Identity())

    def forward_with_head(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """T(x), and the encoder head's logits (``None`` without a head)."""
        output = self.unet(images)
        output, encoder_logits = output if isinstance(output, tuple) else (output, None)
        if self.output_activation == "clamp":
            return (images + output if self.residual else output).clamp(0, 1), encoder_logits
        if self.residual:
            # in float32: bf16 rounds 1 - eps up to 1, where the logit is infinite and its gradient NaN
            output = output.float() + torch.logit(images.float(), eps=1e-3)
        return torch.sigmoid(output), encoder_logits

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_with_head(images)[0]

    def inference_state_dict(self) -> dict[str, Tensor]:
        """T's weights without the encoder head, which the defended model never uses."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("unet.classification_head.")}


class BorderPerturbation(nn.Module):
    """T of T-MR, traditional model reprogramming: the image is shrunk into the centre of the frame
    and a learned border, the same for every image, fills the rest:
    T(x) = B ⊙ sigmoid(W) + (1 − B) ⊙ pad(resize(x)), B the border mask. All T can do to a
    trigger is resample it, which is what the baseline is for: it shows what REFINE's
    image-dependent UNet adds.

    Args:
        image_size: height and width of the victim's inputs (and of T's output).
        border: width of the learned frame in pixels; the image keeps ``image_size - 2 * border``.
    """

    def __init__(self, image_size: int = 32, border: int = 4) -> None:
        super().__init__()
        if not 0 < border < image_size / 2:
            raise ConfigurationError(
                f"border must be in (0, {image_size / 2}) for {image_size}-pixel images, got {border}."
            )
        self.image_size, self.border = image_size, border
        # in logit space, zero = mid-grey: the frame starts neutral
        self.perturbation = nn.Parameter(torch.zeros(1, 3, image_size, image_size))
        mask = torch.ones(1, 1, image_size, image_size)
        mask[..., border:-border, border:-border] = 0
        self.register_buffer("mask", mask)

    def forward_with_head(self, images: Tensor) -> tuple[Tensor, None]:
        """T(x), and no encoder head (the interface of :class:`~lightning_defense.defenses.TransformNet`)."""
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ConfigurationError(
                f"T-MR was built for {self.image_size}x{self.image_size} images, got {tuple(images.shape[-2:])}: "
                "set image_size to the victim's input size."
            )
        inner = self.image_size - 2 * self.border
        shrunk = F.interpolate(images, size=(inner, inner), mode="bilinear", antialias=True, align_corners=False)
        framed = F.pad(shrunk, [self.border] * 4)
        frame = torch.sigmoid(self.perturbation).to(framed.dtype)
        return (self.mask * frame + (1 - self.mask) * framed).clamp(0, 1), None

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_with_head(images)[0]

    def inference_state_dict(self) -> dict[str, Tensor]:
        return self.state_dict()
