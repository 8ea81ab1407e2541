"""REFINE's LightningModule; the algorithm is in :mod:`.torch_model`, the training step in
:class:`~lightning_defense.defenses.reprogramming.ReprogrammingDefense`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_defense.defenses.components import OutputActivation, TransformNet
from lightning_defense.defenses.refine.torch_model import surrogate_loss
from lightning_defense.defenses.reprogramming import ReprogrammingDefense
from lightning_defense.victims import Classifier


class REFINE(ReprogrammingDefense):
    """REFINE around the victim in ``victim`` (a victim file or Lightning checkpoint).

    The auxiliary data's labels are never used: the victim's predictions are the targets.
    Defaults are the official recipe: SGD lr 0.01, momentum 0.9, weight decay 5e-4,
    lr x0.8 at epochs 100 and 130 (150 epochs), cross-entropy plus 0.1 x SupCon at tau 0.07.

    Args:
        victim: path of the frozen victim.
        encoder_name, encoder_depth, decoder_channels, output_activation, residual: the UNet T
            (see :class:`TransformNet`).
        use_permutation: ``False`` is the "w/o HRF" ablation (M = identity).
        permutation_seed: draws the derangement M.
        classification_loss: ``ce``, ``bce`` or ``soft`` (see :class:`RefineModel`).
        contrastive_weight: lambda; 0 is the "w/o SCL" ablation.
        temperature: tau of the supervised contrastive loss.
        soft_label_temperature: softens the ``soft`` loss's distributions.
        encoder_head_weight: > 0 gives T an encoder head trained on the victim's answers (a
            training aid, not in the paper; see :class:`RefineModel`).
        labelled_augmentations: augmentations the victim labels, before T's training inputs are
            drawn from the result (not in the paper; see :class:`RefineModel`), e.g.
            ``class_path: lightning_defense.data.ImageMixup``.
        augment: the recipe's augmentation of T's inputs, after the victim labelled the images
            as they are (see :class:`RefineModel`); the data module must then serve them unaugmented.
        corruptions: trigger-agnostic corruptions of T's inputs after the augmentation, against
            the clean images' labels (not in the paper; see :class:`RefineModel`), e.g.
            ``class_path: lightning_defense.data.RandomPatches``.
        consistency_weight: > 0 asks T to rewrite a corrupted image as it rewrites the clean one
            (not in the paper; see :class:`RefineModel`).
        lr, momentum, weight_decay, lr_milestones, lr_gamma: SGD with a step decay, when the config
            names no optimizer.

    The arguments after ``residual`` are :class:`ReprogrammingDefense`'s, which T-MR shares.
    """

    def __init__(
        self,
        victim: str,
        encoder_name: str = "resnet18",
        encoder_depth: int = 4,
        decoder_channels: Sequence[int] = (256, 128, 64, 32),
        output_activation: OutputActivation = "sigmoid",
        residual: bool = False,
        **kwargs: Any,
    ) -> None:
        # the loss, data and optimizer settings are the base's, with the same defaults
        super().__init__(victim, **kwargs)

    def build_transform_net(self, num_classes: int) -> nn.Module:
        """T: the UNet of the settings, with an encoder head where it is trained."""
        head_classes = num_classes if self.hparams.encoder_head_weight > 0 else 0
        return TransformNet(**self.transform_config(), encoder_head_classes=head_classes)

    def transform_config(self) -> dict[str, Any]:
        """T's settings without the encoder head, which only training uses."""
        hp = self.hparams
        return {
            "encoder_name": hp.encoder_name,
            "encoder_depth": hp.encoder_depth,
            "decoder_channels": list(hp.decoder_channels),
            "output_activation": hp.output_activation,
            "residual": hp.residual,
        }


class BlackBoxREFINE(REFINE):
    """REFINE against a victim that only answers probabilities (paper, appendix E).

    For the first ``distill_epochs`` epochs a surrogate classifier learns to match the victim's
    softmax outputs on the auxiliary data (MSE); afterwards the surrogate is frozen and T is
    trained against it with REFINE's loss. The victim is only ever asked for probabilities,
    without gradients; BA and ASR are measured on the victim itself, M(F(T(x))). The phase
    follows from the epoch, so a resumed run continues in the right one. Under DDP the idle
    part of each phase has unused parameters: use ``strategy: ddp_find_unused_parameters_true``.

    Args:
        surrogate_arch: architecture of the surrogate (any name of ``ARCHITECTURES``).
        distill_epochs: epochs of distillation before T is trained.
        surrogate_lr: SGD learning rate of the surrogate during distillation.
    """

    def __init__(
        self,
        victim: str,
        surrogate_arch: str = "resnet20",
        distill_epochs: int = 20,
        surrogate_lr: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(victim, **kwargs)  # its hyperparameters include these arguments
        victim_model = self.model.victim
        self.surrogate = Classifier(
            surrogate_arch,
            victim_model.num_classes,
            victim_model.mean.flatten().tolist(),
            victim_model.std.flatten().tolist(),
        )

    @property
    def distilling(self) -> bool:
        return self.current_epoch < self.hparams.distill_epochs

    @torch.no_grad()
    def victim_probabilities(self, images: Tensor) -> Tensor:
        """All the black-box victim reveals."""
        return self.victim(images).float().softmax(dim=1)

    def on_train_epoch_start(self) -> None:
        self.surrogate.train(self.distilling)
        self.surrogate.requires_grad_(self.distilling)
        self.model.transform_net.requires_grad_(not self.distilling)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, _ = batch
        images = self.model.labelled_augmentations(images)  # the surrogate learns on what T will see labelled
        probabilities = self.victim_probabilities(images)
        if self.distilling:
            loss = surrogate_loss(self.surrogate(images), probabilities)
            self.log("train/surrogate", loss, prog_bar=True)
            return loss
        # log-probabilities are logits of the same distribution: all the loss needs of the victim
        # floored at the smallest normal float, so that even a tempered target stays faithful
        log_probabilities = probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()
        losses = self.model.loss(images, log_probabilities, classifier=self.surrogate, gather=self.gather_batch)
        self.log_dict({f"train/{name}": value for name, value in losses.items()}, prog_bar=True)
        return losses["loss"]

    def configure_optimizers(self) -> dict[str, Any]:
        recipe = super().configure_optimizers()
        # params without a gradient in a phase are skipped by SGD, so one optimizer serves both
        recipe["optimizer"].add_param_group(
            {"params": list(self.surrogate.parameters()), "lr": self.hparams.surrogate_lr}
        )
        return recipe
