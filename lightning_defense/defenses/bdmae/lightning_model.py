"""BDMAE's two LightningModules: :class:`MAETask` trains the masked autoencoder on unlabeled
images, :class:`BDMAE` defends a victim with it at test time (``lightning validate``/``test``/
``predict``). The algorithm is in :mod:`.torch_model`, the MAE in :mod:`.mae`."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import MeanSquaredError
from torchmetrics.image import PeakSignalNoiseRatio

from lightning_defense.data.datamodules import served_image_size
from lightning_defense.defenses.base import DefenseModule
from lightning_defense.defenses.bdmae.mae import (
    MaskedAutoencoder,
    default_patch_size,
    load_mae,
    save_mae,
    token_mask_to_pixels,
)
from lightning_defense.defenses.bdmae.torch_model import BDMAEDefense
from lightning_defense.deprecation import warn_renamed
from lightning_defense.errors import ConfigurationError
from lightning_defense.io.run_folder import run_folder
from lightning_defense.training.callbacks import FigureRow
from lightning_defense.victims import CIFAR10_MEAN, CIFAR10_STD, Classifier, load_victim


class MAETask(LightningModule):
    """Trains a :class:`~lightning_defense.defenses.bdmae.mae.MaskedAutoencoder` on the training
    images of any DataModule; labels are never read. Validation and test measure the
    reconstruction of the masked tokens on the clean test set (loader 0; a poisoned loader is
    skipped), in [0, 1] pixels: ``val/reconstruction_mse`` and ``val/psnr`` (dB), beside the
    training objective ``val/loss``. Validation masks are drawn from a generator seeded per batch,
    so epochs compare on the same masks. At the end of ``fit`` the MAE is written as
    ``mae.safetensors`` in the run folder, the file :class:`BDMAE` reads.

    The default optimizer is MAE's recipe: AdamW with betas (0.9, 0.95), weight decay on weight
    matrices only, a linear warmup and a cosine decay per step (a config's ``optimizer`` and
    ``lr_scheduler`` replace it).

    Args:
        image_size: side of the images the MAE works on; ``None``: the data's (square) size.
        patch_size: side of a token's cell; ``None``: :func:`~.mae.default_patch_size` of the size
            (4 at 32, 8 at 64, 16 at 224).
        embed_dim, depth, num_heads: the MAE encoder's (see its class).
        decoder_embed_dim, decoder_depth, decoder_num_heads: its decoder's.
        mlp_ratio, mean, std: the MAE's.
        mask_ratio: share of the tokens masked in training.
        lr, weight_decay: AdamW's.
        warmup_epochs: epochs of linear warmup before the cosine decay.
        export_name: file name of the exported MAE in the run folder.
    """

    def __init__(
        self,
        image_size: int | None = None,
        patch_size: int | None = None,
        embed_dim: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        decoder_embed_dim: int = 128,
        decoder_depth: int = 2,
        decoder_num_heads: int = 4,
        mlp_ratio: float = 4.0,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        mask_ratio: float = 0.75,
        lr: float = 1.5e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 5.0,
        export_name: str = "mae.safetensors",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0 < mask_ratio < 1:
            raise ConfigurationError(f"mask_ratio must be in (0, 1), got {mask_ratio}.")
        #: built for the data's size in :meth:`configure_model` when ``image_size`` is None
        self.mae: MaskedAutoencoder | None = None if image_size is None else self._build(image_size)
        self.val_mse, self.test_mse = MeanSquaredError(), MeanSquaredError()
        self.val_psnr, self.test_psnr = PeakSignalNoiseRatio(data_range=1.0), PeakSignalNoiseRatio(data_range=1.0)

    def _build(self, image_size: int) -> MaskedAutoencoder:
        hp = self.hparams
        return MaskedAutoencoder(
            image_size,
            hp.patch_size or default_patch_size(image_size),
            hp.embed_dim,
            hp.depth,
            hp.num_heads,
            hp.decoder_embed_dim,
            hp.decoder_depth,
            hp.decoder_num_heads,
            hp.mlp_ratio,
            tuple(hp.mean),
            tuple(hp.std),
        )

    def configure_model(self) -> None:
        datamodule = self.trainer.datamodule
        served = served_image_size(datamodule)
        if self.mae is None:
            if served is None or served[0] != served[1]:
                raise ConfigurationError(
                    f"{type(datamodule).__name__} serves {'images of no fixed size' if served is None else served}: "
                    "set model.init_args.image_size to the victim's (square) resolution."
                )
            self.mae = self._build(served[0])
            return
        size = self.mae.image_size
        if served is not None and tuple(served) != (size, size):
            raise ConfigurationError(
                f"The MAE works on {size}x{size} images but {type(datamodule).__name__} serves "
                f"{served[0]}x{served[1]}: set model.init_args.image_size to the victim's resolution (or null: the "
                "data's)."
            )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images = batch[0]  # the labels are never read
        token_mask = self.mae.random_token_mask(len(images), self.hparams.mask_ratio, images.device)
        loss = self.mae.loss(images, self.mae(images, token_mask), token_mask)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, images: Tensor, batch_idx: int, stage: str) -> None:
        # fixed masks per batch and process, drawn outside the run's random stream
        generator = torch.Generator().manual_seed(batch_idx + 1_000_003 * self.global_rank)
        token_mask = self.mae.random_token_mask(len(images), self.hparams.mask_ratio, images.device, generator)
        predictions = self.mae(images, token_mask)
        reconstruction = self.mae.to_images(predictions, images.shape[-2:])
        pixels = token_mask_to_pixels(token_mask, self.mae.grid_size, images.shape[-2:]).expand_as(images)
        mse, psnr = getattr(self, f"{stage}_mse"), getattr(self, f"{stage}_psnr")
        mse.update(reconstruction[pixels], images[pixels].float())
        psnr.update(reconstruction[pixels], images[pixels].float())
        log = {"on_step": False, "on_epoch": True, "add_dataloader_idx": False}
        self.log(f"{stage}/loss", self.mae.loss(images, predictions, token_mask), **log)
        self.log(f"{stage}/reconstruction_mse", mse, **log)
        self.log(f"{stage}/psnr", psnr, prog_bar=True, **log)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:  # the clean test set; the MAE has nothing to learn from triggers
            self._evaluate(batch[0], batch_idx, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            self._evaluate(batch[0], batch_idx, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # no decay on biases, norms and the learned tokens (MAE's recipe)
        tokens = {id(self.mae.cls_token), id(self.mae.mask_token)}
        decay, no_decay = [], []
        for parameter in self.mae.parameters():
            (no_decay if parameter.ndim < 2 or id(parameter) in tokens else decay).append(parameter)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=(0.9, 0.95))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = hp.warmup_epochs * total / max(self.trainer.max_epochs or 1, 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_end(self) -> None:
        folder = run_folder(self.trainer)  # on every rank: it is a collective under DDP
        if not self.trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}
        path = save_mae(folder / self.hparams.export_name, self.mae, {"validation": json.dumps(metrics)})
        quality = f" (masked tokens: PSNR {metrics['val/psnr']:.2f} dB)" if "val/psnr" in metrics else ""
        rank_zero_info(f"MAE written to {path}{quality}")


class MAETrainer(MAETask):
    """The earlier name of :class:`MAETask` (configs naming it keep working for one release)."""

    def __init__(self, **kwargs: Any) -> None:
        warn_renamed("MAETrainer", "MAETask")
        super().__init__(**kwargs)


class BDMAE(DefenseModule):
    """BDMAE around the victim in ``victim``, restoring with the MAE in ``mae``: BA and ASR of
    victim(purified x) beside the victim's own. Nothing is trained: run it with
    ``lightning validate``, ``test`` or ``predict``. The defense reaches the victim through a
    hard-label oracle only; the victim's own BA/ASR (``val/victim_*``) are the evaluation
    harness's. Every image costs 52 victim queries and 50 MAE restorations with the defaults.

    Args:
        victim: path of the victim file.
        mae: path of the MAE: a ``mae.safetensors`` written by :class:`MAETask`
            (``configs/bdmae/mae.yaml``), or an official MAE checkpoint with its decoder (see
            :mod:`lightning_defense.defenses.bdmae.mae`).

    The other arguments are :class:`~lightning_defense.defenses.bdmae.torch_model.BDMAEDefense`'s,
    with the authors' defaults.
    """

    model: BDMAEDefense

    def __init__(
        self,
        victim: str,
        mae: str,
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
        victim_model = load_victim(victim)
        super().__init__(victim_model.num_classes)
        self.save_hyperparameters()
        self.model = BDMAEDefense(
            victim_model,
            load_mae(mae),
            repeats=repeats,
            masks_per_repeat=masks_per_repeat,
            mask_ratio=mask_ratio,
            refine_steps=refine_steps,
            refine_step_size=refine_step_size,
            neighbour_bonus=neighbour_bonus,
            image_candidate_threshold=image_candidate_threshold,
            image_score_weight=image_score_weight,
            thresholds=tuple(thresholds),
            max_restored_share=max_restored_share,
            chunk_size=chunk_size,
        )

    @property
    def victim(self) -> Classifier:
        return self.model.oracle.classifier

    def setup(self, stage: str) -> None:
        super().setup(stage)
        served, size = served_image_size(self.trainer.datamodule), self.model.mae.image_size
        if served is not None and tuple(served) != (size, size):
            # it runs (the MAE resizes to its size and back) but restores blurred tokens
            rank_zero_warn(
                f"The MAE in {self.hparams.mae!r} works on {size}x{size} images and the data are {served[0]}x"
                f"{served[1]}: images are resized to it and back. Train one at the data's size for this victim: "
                "`lightning fit --config configs/bdmae/mae.yaml --model.init_args.image_size null` on its data."
            )

    def forward(self, images: Tensor) -> Tensor:
        """One-hot "logits" of the victim's hard label of the purified images (for BA/ASR)."""
        return F.one_hot(self.model(images), self.victim.num_classes).float()

    def figure_rows(self, name: str, images: Tensor) -> list[FigureRow]:
        """For :class:`~lightning_defense.training.callbacks.TransformGrid`: the images with the victim's
        labels, and the purified images with the defended labels."""
        purified = self.model.purify(images).images
        before, after = self.model.oracle(images), self.model.oracle(purified)
        return [
            (name, images, [f"f: {int(p)}" for p in before]),
            (f"BDMAE({name})", purified, [f"f∘BDMAE: {int(p)}" for p in after]),
        ]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        raise ConfigurationError(
            "BDMAE trains nothing against the victim: run `lightning validate` or `lightning test` with "
            "configs/bdmae.yaml. Its MAE is trained separately: `lightning fit --config configs/bdmae/mae.yaml`."
        )

    def configure_optimizers(self) -> None:
        return None
