"""Neural Cleanse's LightningModule: the phases by epoch; the algorithm is in :mod:`.torch_model`."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_defense.defenses.finetune.lightning_model import FineTune
from lightning_defense.defenses.neural_cleanse.torch_model import NeuralCleanseModel, anomaly_indices, most_anomalous
from lightning_defense.errors import ConfigurationError
from lightning_defense.training.callbacks import FigureRow
from lightning_defense.victims import Classifier, read_victim_metadata


class NeuralCleanse(FineTune):
    """Neural Cleanse (Wang et al., IEEE S&P 2019) around the victim in ``victim``: for
    ``inversion_epochs`` epochs every class's trigger is reverse-engineered on the auxiliary
    images; then the class whose mask is anomalously small (MAD) is flagged and, for the
    remaining epochs, a copy of the victim unlearns its trigger on the auxiliary data's labels (the
    defended model, written as ``repaired_victim.safetensors``). When no class is flagged, the run
    stops after the inversion and the defended model is the victim.

    Validation logs, besides BA/ASR/RA of the copy and of the victim: ``anomaly_index`` (the
    largest among classes with a below-median mask norm), ``target_mask_norm`` (that class's L1
    norm), and after detection ``detected_target`` and ``dsr`` (1 when it is the attack's target),
    the fields BTI-DBF logs. The phases share two optimizers (manual optimization); under DDP use
    ``strategy: ddp_find_unused_parameters_true`` (each phase leaves the other's parameters idle).

    Args:
        victim: path of the victim file.
        inversion_epochs: epochs of trigger reverse-engineering before detection.
        image_size: ``[height, width]`` of the victim's inputs, where its file does not record it.
        initial_cost, cost_multiplier, success_threshold, unlearn_fraction: see
            :class:`~.torch_model.NeuralCleanseModel` (official 1e-3, 1.5, 0.99, 0.2).
        cost_patience: steps per window of the cost schedule.
        anomaly_threshold: anomaly index above which a class is flagged (official 2).
        inversion_lr: Adam's learning rate for the masks and patterns (official 0.1, betas 0.5, 0.9).
        lr, momentum, weight_decay: SGD of the unlearning, with a cosine decay over the epochs after the
            inversion (FT's recipe).
    """

    model: NeuralCleanseModel

    def __init__(
        self,
        victim: str,
        inversion_epochs: int = 100,
        image_size: tuple[int, int] | None = None,
        initial_cost: float = 1e-3,
        cost_multiplier: float = 1.5,
        cost_patience: int = 5,
        success_threshold: float = 0.99,
        anomaly_threshold: float = 2.0,
        unlearn_fraction: float = 0.2,
        inversion_lr: float = 0.1,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
    ) -> None:
        if inversion_epochs < 1 or cost_patience < 1:
            raise ConfigurationError(
                f"inversion_epochs and cost_patience must be >= 1, got {inversion_epochs} and {cost_patience}."
            )
        metadata = read_victim_metadata(victim)
        size = image_size or (metadata.image_size() if metadata is not None else None)
        if size is None:
            raise ConfigurationError(
                f"The victim file {victim!r} does not record its image size: set model.init_args.image_size."
            )
        # read by build(), which FineTune's __init__ calls
        self.trigger_settings = {
            "image_size": tuple(size),
            "initial_cost": initial_cost,
            "cost_multiplier": cost_multiplier,
            "success_threshold": success_threshold,
            "unlearn_fraction": unlearn_fraction,
        }
        super().__init__(victim, lr, momentum, weight_decay)
        self.save_hyperparameters()
        self.automatic_optimization = False
        # the cost schedule's current window (buffers: a resumed run continues it)
        self.register_buffer("window_hits", torch.zeros(self.victim.num_classes))
        self.register_buffer("window_counts", torch.zeros(self.victim.num_classes))
        self.register_buffer("window_steps", torch.tensor(0))

    def build(self, victim: Classifier) -> NeuralCleanseModel:
        settings = dict(self.trigger_settings)
        height, width = settings.pop("image_size")
        channels = victim.mean.shape[1]
        return NeuralCleanseModel(victim, (channels, height, width), **settings)

    @property
    def inverting(self) -> bool:
        return self.current_epoch < self.hparams.inversion_epochs

    def on_train_epoch_start(self) -> None:
        if self.inverting or int(self.model.detected_target) >= 0:
            return
        target = self.model.detect(self.hparams.anomaly_threshold)
        indices = anomaly_indices(self.model.triggers.final_norms())
        if target < 0:
            rank_zero_warn(
                f"Neural Cleanse flagged no class (largest anomaly index {float(indices.max()):.2f}, threshold "
                f"{self.hparams.anomaly_threshold}): nothing to unlearn, the defended model is the victim."
            )
            self.trainer.should_stop = True
            return
        rank_zero_info(f"Neural Cleanse flagged class {target} (anomaly index {float(indices[target]):.2f}).")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        inversion, unlearning = self.optimizers()
        if self.inverting:
            losses, hits, counts = self.model.inversion_loss(images)
            optimizer = inversion
            self.window_hits += hits.detach()
            self.window_counts += counts
            self.window_steps += 1
        else:
            losses, optimizer = self.model.unlearning_loss(images, labels), unlearning
        optimizer.zero_grad()
        self.manual_backward(losses["loss"])
        optimizer.step()
        if self.inverting and int(self.window_steps) >= self.hparams.cost_patience:
            reduce = self.trainer.strategy.reduce  # every rank moves its λ alike
            self.model.update_costs(
                reduce(self.window_hits, reduce_op="sum"), reduce(self.window_counts, reduce_op="sum")
            )
            self.window_hits.zero_()
            self.window_counts.zero_()
            self.window_steps.zero_()
        phase = "inversion" if self.inverting else "unlearning"
        self.log_dict({f"train/{phase}_{name}": value for name, value in losses.items()}, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self._log_detection("val")

    def on_test_epoch_end(self) -> None:
        self._log_detection("test")

    def _log_detection(self, stage: str) -> None:
        norms = self.model.triggers.final_norms()
        indices = anomaly_indices(norms)
        candidate = most_anomalous(norms)
        # the same on every rank; sync_dist only keeps Lightning from warning under DDP
        self.log(f"{stage}/anomaly_index", float(indices[candidate]), sync_dist=True)
        self.log(f"{stage}/target_mask_norm", float(norms[candidate]), sync_dist=True)
        detected = int(self.model.detected_target)
        attack = getattr(self.trainer.datamodule, "attack", None)
        if detected >= 0:
            self.log(f"{stage}/detected_target", float(detected), sync_dist=True)
            if attack is not None and attack.label_mode == "all_to_one":
                self.log(f"{stage}/dsr", float(detected == attack.target), sync_dist=True)

    def figure_rows(self, name: str, images: Tensor) -> list[FigureRow]:
        """For :class:`~lightning_defense.training.callbacks.TransformGrid`: every class's reversed
        trigger m ⊙ p (with its mask norm and anomaly index) once, and the images with the flagged
        (or most anomalous) class's trigger, with the defended model's predictions."""
        masks, patterns = self.model.triggers.final_triggers()
        norms = self.model.triggers.final_norms()
        indices = anomaly_indices(norms)
        target = int(self.model.detected_target)
        if target < 0:
            target = most_anomalous(norms)
        classes = torch.full((len(images),), target, device=images.device)
        stamped = self.model.triggers.stamp(images, classes, final=True)
        rows: list[FigureRow] = []
        if name == "clean":
            titles = [f"{c}: |m| {float(norms[c]):.0f}, AI {float(indices[c]):.1f}" for c in range(len(norms))]
            rows.append(("m ⊙ p", (masks * patterns).float(), titles))
        predictions = self(stamped).argmax(1)
        rows.append((f"{name} + trigger {target}", stamped.float(), [f"→ {int(p)}" for p in predictions]))
        return rows

    def on_train_epoch_end(self) -> None:
        if self.current_epoch >= self.hparams.inversion_epochs:
            self.lr_schedulers().step()  # manual optimization: the unlearning's cosine decay is ours to step

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        hp = self.hparams
        inversion = torch.optim.Adam(self.model.triggers.parameters(), lr=hp.inversion_lr, betas=(0.5, 0.9))
        unlearning = torch.optim.SGD(
            self.model.repaired.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
        epochs = max(1, (self.trainer.max_epochs or hp.inversion_epochs + 1) - hp.inversion_epochs)
        return [inversion, unlearning], [torch.optim.lr_scheduler.CosineAnnealingLR(unlearning, epochs)]
