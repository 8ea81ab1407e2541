"""Guided Input Calibration (GIC): nudge each auxiliary image, within a small L-infinity ball,
toward what the victim expects of its class, so that a defense trained on shifted or external
data sees inputs closer to the victim's own distribution.

For each image a perturbation eps (init 0) is trained with Adam to minimise
CE(f(clamp(x + eps, 0, 1)), y), y the given label or the victim's pseudo-label, and projected back
to ``|eps| <= epsilon`` after every step. The calibrated set is computed once, cached on disk, and
served like any other auxiliary data (:class:`Calibrated`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import track
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_defense.data.auxiliary import AuxiliaryData
from lightning_defense.data.datamodules import BackdoorDataModule
from lightning_defense.data.datasets import data_home
from lightning_defense.errors import ConfigurationError
from lightning_defense.victims import Classifier


def calibrate_inputs(
    victim: nn.Module, images: Tensor, labels: Tensor, epsilon: float = 0.1, lr: float = 0.1, steps: int = 100
) -> Tensor:
    """GIC on one batch of [0, 1] images: ``clamp(x + eps, 0, 1)`` with ``|eps| <= epsilon``.

    The loss is summed over the batch, so each image's perturbation (and its Adam state) is the
    same whatever batch it is computed in.
    """
    perturbation = torch.zeros_like(images, requires_grad=True)
    optimizer = torch.optim.Adam([perturbation], lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(victim((images + perturbation).clamp(0, 1)), labels, reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            perturbation.clamp_(-epsilon, epsilon)
    return (images + perturbation).detach().clamp(0, 1)


class Calibrated(AuxiliaryData):
    """Any auxiliary data after Guided Input Calibration against the defense's victim.

    Args:
        base: the auxiliary data to calibrate (its labels, or the victim's pseudo-labels for
            unlabeled data, are the calibration targets).
        epsilon: L-infinity bound of the perturbation, in [0, 1] pixel units (not the victim's
            normalized units: the GIC paper's 0.1, if meant after BackdoorBench's normalization, is
            about 0.025 here; benchmarks/README.md measures both readings).
        lr: Adam's learning rate for the perturbations.
        steps: Adam steps per image.
        batch_size: images calibrated at once.
        device: where to run the victim; default the GPU when there is one.
        cache_dir: calibrated sets are saved here, named by a hash of the images, labels, victim
            weights and these settings, and reused by later runs (a study calibrates once for
            every defense); default ``<data home>/calibrated``; ``None`` with ``cache=False``.
        cache: read and write the cache.

    The result is stored as uint8 like every image set: rounding moves a pixel by at most 1/510.
    It is computed outside autocast, in float32. Under DDP every process calibrates the same set
    (a deterministic computation) unless the cache already holds it: run one process first to fill
    the cache when the set is large.
    """

    def __init__(
        self,
        base: AuxiliaryData,
        epsilon: float = 0.1,
        lr: float = 0.1,
        steps: int = 100,
        batch_size: int = 256,
        device: str | None = None,
        cache_dir: str | None = None,
        cache: bool = True,
    ) -> None:
        if not 0 < epsilon <= 1:
            raise ConfigurationError(f"epsilon must be in (0, 1], got {epsilon}.")
        if steps < 1 or batch_size < 1:
            raise ConfigurationError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}.")
        self.base = base
        self.epsilon = epsilon
        self.lr = lr
        self.steps = steps
        self.batch_size = batch_size
        self.device = device
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else data_home() / "calibrated"
        self.cache = cache

    def _cache_file(self, victim: Classifier, images: Tensor, labels: Tensor) -> Path:
        digest = hashlib.sha256()
        for tensor in (images, labels, *victim.state_dict().values()):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digest.update(repr((self.epsilon, self.lr, self.steps)).encode())
        return self.cache_dir / f"gic_{digest.hexdigest()[:24]}.safetensors"

    def select(self, source: BackdoorDataModule, victim: Classifier | None = None) -> tuple[Tensor, Tensor]:
        if victim is None:
            raise ConfigurationError(
                "Calibrated data is calibrated against the victim: give the DefenseDataModule a `victim` file."
            )
        images, labels = self.base.select(source, victim)
        cache_file = self._cache_file(victim, images, labels) if self.cache else None
        if cache_file is not None and cache_file.is_file():
            return load_file(cache_file)["images"], labels
        calibrated = self.calibrate(victim, images, labels)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            # per process: under DDP every rank calibrates the same set and writes the same entry
            partial = cache_file.with_suffix(f".{os.getpid()}.partial")
            save_file({"images": calibrated}, partial)
            partial.replace(cache_file)  # a run killed while writing leaves no half file behind
        return calibrated, labels

    def calibrate(self, victim: Classifier, images: Tensor, labels: Tensor) -> Tensor:
        """Calibrate uint8 ``images`` in batches; returns uint8."""
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        original = victim.mean.device
        victim.to(device)
        batches = zip(images.split(self.batch_size), labels.split(self.batch_size), strict=True)
        out = []
        try:
            with torch.enable_grad():
                for batch, batch_labels in track(
                    batches, total=-(-len(images) // self.batch_size), description="Guided input calibration"
                ):
                    batch = batch.to(device).float().div(255)
                    calibrated = calibrate_inputs(
                        victim, batch, batch_labels.to(device), self.epsilon, self.lr, self.steps
                    )
                    out.append(calibrated.mul(255).round().to(torch.uint8).cpu())
        finally:
            victim.to(original)
        return torch.cat(out) if out else images.clone()
