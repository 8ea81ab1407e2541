"""Callbacks shared by every module."""

from __future__ import annotations

import csv
import json
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_defense.analysis.feature_views import (
    EmbeddingMethod,
    FeatureSet,
    embed,
    feature_figure,
    penultimate_features,
)
from lightning_defense.errors import ConfigurationError, TrainingDivergedError
from lightning_defense.io.run_folder import run_folder

# a figure row: its label, [0, 1] images, and one title per image
FigureRow = tuple[str, Tensor, list[str]]


class _EpochMetrics(Callback):
    """The metrics logged in each training epoch (its validation included): Lightning runs the
    epoch's validation before ``on_train_epoch_end``, so they are fresh there. Metrics not logged
    this epoch are left out: validation on epochs that skip it (``check_val_every_n_epoch``), and
    the parts of a phased defense (BTI-DBF) that are idle."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = time.monotonic()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.before = dict(trainer.callback_metrics)

    def fresh_metrics(self, trainer: Trainer) -> dict[str, float]:
        # a metric logged this epoch is a new tensor, one that was not is the same object as before
        before = getattr(self, "before", {})
        return {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if before.get(k) is not v}


class EpochSummary(_EpochMetrics):
    """One line per training epoch with the metrics logged in that epoch and the elapsed time, for
    runs whose output goes to a file, where a live progress bar shows nothing until the end."""

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in self.fresh_metrics(trainer).items())
        elapsed = time.monotonic() - getattr(self, "start", time.monotonic())
        rank_zero_info(f"epoch {trainer.current_epoch}/{trainer.max_epochs - 1} [{elapsed / 60:.1f} min]: {metrics}")


class EpochMetricsFile(_EpochMetrics):
    """The run's own record of its metrics, whatever the logger (TensorBoard, W&B, none): one JSON
    line per training epoch in ``epochs.jsonl`` in the run folder, ``{"epoch": e, "<metric>": value}``
    (validation metrics included on the epochs that validate). ``lightning-defense study`` and the
    benchmark sweeps tabulate runs from it. Added to every run by the CLI."""

    FILENAME = "epochs.jsonl"

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = run_folder(trainer) / self.FILENAME  # on every rank: it is a collective under DDP
        if trainer.is_global_zero and not trainer.sanity_checking:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps({"epoch": trainer.current_epoch, **self.fresh_metrics(trainer)}) + "\n")


class RandomStateCheckpoint(Callback):
    """Save the global random state (torch, CUDA, Python, NumPy) in every checkpoint and restore it
    on resume, so a resumed run draws the same shuffles, augmentations and noise as one that was
    never interrupted (Lightning restores weights, optimizers and loops, not random state).

    Stored as tensors and plain numbers, so checkpoints stay loadable with ``weights_only=True``.
    """

    @staticmethod
    def _local_state() -> dict[str, Any]:
        version, state, gauss = random.getstate()
        numpy_state = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,  # this process's device
            "python": [version, list(state), gauss],
            "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        }

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # every rank calls this hook and rank 0 writes the file: it carries one state per rank
        states = [self._local_state()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, self._local_state())
        checkpoint["random_state"] = states

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("random_state")
        if not states:  # a checkpoint from before this callback: resume as Lightning does
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(
                f"The checkpoint holds the random state of {len(states)} processes, this run has "
                f"{trainer.world_size}: shuffles and augmentations will differ from an uninterrupted run."
            )
            return
        saved = states[trainer.global_rank]
        torch.set_rng_state(saved["torch"])
        if saved["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["cuda"])
        version, state, gauss = saved["python"]
        random.setstate((version, tuple(state), gauss))
        name, keys, *rest = saved["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


class StopOnNonFiniteLoss(Callback):
    """End training at the first NaN or infinite training loss (the returned one or any logged
    ``train/...``), naming the step, the fix and the last good checkpoint.

    Checkpoints are written at the end of an epoch after this check (and after one of the trained
    weights), so ``last.ckpt`` never holds diverged weights. Under DDP every rank stops together.
    """

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        losses = dict(outputs) if isinstance(outputs, dict) else {"loss": outputs} if outputs is not None else {}
        losses |= {k: v for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        bad = sorted(k for k, v in losses.items() if isinstance(v, Tensor) and v.numel() == 1 and not v.isfinite())
        names = ", ".join(bad) or "on another process"
        self._stop_if(trainer, bool(bad), f"the training loss ({names}) became non-finite")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trained = [p for p in pl_module.parameters() if p.requires_grad]
        broken = not all(bool(p.isfinite().all()) for p in trained)
        self._stop_if(trainer, broken, "the trained weights became non-finite")

    def _stop_if(self, trainer: Trainer, local: bool, what: str) -> None:
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
        resume = f" The last good checkpoint is {last}." if last else " No checkpoint was written before."
        raise TrainingDivergedError(
            f"Training diverged: {what} at step {trainer.global_step} (epoch {trainer.current_epoch}). Lower the "
            "learning rate (the optimizer's lr), or use bf16-mixed instead of 16-mixed precision, and start "
            f"again.{resume}"
        )


class PredictionWriter(BasePredictionWriter):
    """Write ``lightning predict`` results to ``predictions.csv`` in the run folder: the index of
    each image in the predict set and the predicted class. Under DDP each process writes
    ``predictions_rank<N>.csv`` with its own share (indices say which images)."""

    def __init__(self, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.filename = filename

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        # Lightning nests these per predict loader (predictions only when there are several)
        if predictions and isinstance(predictions[0], list):
            predictions = predictions[0]
        if batch_indices and batch_indices[0] and isinstance(batch_indices[0][0], list):
            batch_indices = batch_indices[0]
        name = self.filename
        if trainer.world_size > 1:
            name = name.replace(".csv", f"_rank{trainer.global_rank}.csv")
        path = run_folder(trainer) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pairs = zip(predictions, batch_indices)
        rows = sorted((int(i), int(p)) for batch, indices in pairs for i, p in zip(indices, batch.tolist()))
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "prediction"])
            writer.writerows(rows)
        rank_zero_info(f"Predictions written to {path}")


PLOTS_MISSING = "matplotlib is not installed: `pip install 'lightning-defense[plots]'` adds it"


class TransformGrid(Callback):
    """After each validation, a figure of a few clean and poisoned test images and what the defense
    does with them, as rows the module draws with ``figure_rows(name, images)`` (REFINE: T(x), the
    paper's figure 6; BTI-DBF: the inverted trigger G(x) and the purified images); titles give the
    predictions. It is saved as ``transforms/epoch_NNN.png`` in the run folder and sent to the
    run's loggers through their own image API (TensorBoard ``add_figure``, W&B and others
    ``log_image``, MLflow ``log_figure``), under ``transforms``. Without matplotlib (the ``plots``
    extra) it warns once and draws nothing.

    Args:
        num_images: images per row, evenly spaced through each evaluation set (the same every epoch).
    """

    def __init__(self, num_images: int = 8) -> None:
        self.num_images = num_images
        self.drawing = True

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.drawing = False
            rank_zero_warn(f"TransformGrid draws no figures: {PLOTS_MISSING}.")

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self.drawing:
            return
        folder = run_folder(trainer) / "transforms"  # on every rank: it is a collective under DDP
        if not trainer.is_global_zero:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        datamodule = trainer.datamodule
        rows: list[FigureRow] = []
        for name, dataset in (("clean", datamodule.test_set), ("poisoned", datamodule.poisoned_test_set)):
            if dataset is None:
                continue
            spread = torch.linspace(0, len(dataset) - 1, self.num_images).long()  # sets are sorted by class
            images = dataset.images[spread].float().div(255).to(pl_module.device)
            rows += pl_module.figure_rows(name, images)
        figure, axes = plt.subplots(len(rows), self.num_images, figsize=(1.4 * self.num_images, 1.6 * len(rows)))
        for row, (name, images, titles) in zip(axes, rows):
            for ax, image, title in zip(row, images, titles):
                ax.imshow(image.float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
                ax.set_title(title, fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])
            row[0].set_ylabel(name, fontsize=8)
        figure.suptitle(f"epoch {trainer.current_epoch}", fontsize=9)
        folder.mkdir(parents=True, exist_ok=True)
        figure.savefig(folder / f"epoch_{trainer.current_epoch:03d}.png", dpi=100, bbox_inches="tight")
        for logger in trainer.loggers:
            log_figure(logger, "transforms", figure, trainer.global_step)
        plt.close(figure)


class FeatureView(Callback):
    """A figure of the penultimate features of clean and poisoned test images embedded in two
    dimensions (:mod:`lightning_defense.analysis.feature_views`): for a defense, the victim's
    beside the defended model's; for a victim being trained, its own. Drawn at the end of
    ``fit``, ``validate`` and ``test`` (``lightning features`` is ``validate`` with this callback),
    saved as ``features/<stage>_<method>.png`` in the run folder and sent to the loggers under
    ``features``. The module names the classifier whose features are read with
    ``answering_classifier()``.

    Args:
        num_images: images drawn from each test set (clean, poisoned), evenly spaced through it.
        method: ``tsne`` (scikit-learn's t-SNE) or ``pca``.
        seed: of the embedding.
    """

    def __init__(self, num_images: int = 500, method: EmbeddingMethod = "tsne", seed: int = 0) -> None:
        if num_images < 4:
            raise ConfigurationError(f"num_images must be at least 4 for an embedding, got {num_images}.")
        if method not in ("tsne", "pca"):
            raise ConfigurationError(f"method must be 'tsne' or 'pca', got {method!r}.")
        self.num_images, self.method, self.seed = num_images, method, seed

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.draw(trainer, pl_module, "fit")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":  # not the validations inside fit
            self.draw(trainer, pl_module, "validate")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.draw(trainer, pl_module, "test")

    @torch.no_grad()
    def draw(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        folder = run_folder(trainer) / "features"  # on every rank: it is a collective under DDP
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        clean, poisoned = getattr(datamodule, "test_set", None), getattr(datamodule, "poisoned_test_set", None)
        if clean is None or poisoned is None:
            rank_zero_warn(
                "FeatureView draws nothing: it needs a data module with a clean and a poisoned test set "
                "(this project's, with an attack or a victim file that records one)."
            )
            return
        picked = [dataset_sample(dataset, self.num_images) for dataset in (clean, poisoned)]
        name, answering = type(pl_module).__name__, pl_module.answering_classifier()
        models = [(name, pl_module, answering.linear_layer)]
        victim = getattr(pl_module, "victim", None)
        if victim is not None:  # a defense: the victim beside the defended model
            models = [
                ("victim", victim, victim.linear_layer),
                (f"defended ({name})", pl_module, answering.linear_layer),
            ]
        was_training = pl_module.training
        pl_module.eval()
        panels = []
        for title, model, layer in models:
            features = [penultimate_features(model, layer, images) for images, _ in picked]
            points = embed(torch.cat(features), self.method, self.seed)
            count = len(features[0])
            panels.append(FeatureSet(title, points[:count], picked[0][1].numpy(), points[count:], picked[1][1].numpy()))
        pl_module.train(was_training)
        figure = feature_figure(panels)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stage}_{self.method}.png"
        figure.savefig(path, dpi=120, bbox_inches="tight")
        for logger in trainer.loggers:
            log_figure(logger, "features", figure, trainer.global_step)
        import matplotlib.pyplot as plt

        plt.close(figure)
        rank_zero_info(f"Feature view written to {path}")


def dataset_sample(dataset: Any, count: int) -> tuple[Tensor, Tensor]:
    """``count`` images evenly spaced through ``dataset`` (its sets are sorted by class) and their
    true classes."""
    spread = torch.linspace(0, len(dataset) - 1, min(count, len(dataset))).long()
    labels = dataset.true_labels if getattr(dataset, "true_labels", None) is not None else dataset.labels
    return dataset.images[spread], labels[spread]


def log_figure(logger: Logger, key: str, figure: Any, step: int) -> None:
    """A matplotlib figure to a logger through its own image API; loggers without one (CSV) get
    nothing here (the figure's PNG is in the run folder)."""
    experiment = logger.experiment
    if hasattr(experiment, "add_figure"):  # TensorBoard (torch's SummaryWriter or tensorboardX)
        experiment.add_figure(key, figure, global_step=step, close=False)
    elif hasattr(logger, "log_image"):  # W&B, Neptune, Comet: images as arrays
        figure.canvas.draw()
        image = np.asarray(figure.canvas.buffer_rgba())[..., :3]
        logger.log_image(key=key, images=[image], step=step)
    elif hasattr(experiment, "log_figure") and getattr(logger, "run_id", None):  # MLflow
        experiment.log_figure(logger.run_id, figure, f"{key}/step_{step:07d}.png")
