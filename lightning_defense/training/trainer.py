"""The Trainer of the ``lightning`` command: Lightning's, with precision and memory layout that
follow the hardware (:mod:`lightning_defense.training.hardware`), and its checkpoint writer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import Trainer
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import rank_zero_info

from lightning_defense.io.torch_files import check_checkpoint, is_url, load_weights
from lightning_defense.training.hardware import auto_precision, device_type, uses_channels_last


class DefenseTrainer(Trainer):
    """Lightning's Trainer with two settings that default to the hardware's best.

    Args:
        precision: a Lightning precision, or ``auto``: ``bf16-mixed`` where the device computes bf16
            natively (CUDA from compute capability 8.0; a CPU with AVX-512 BF16 or AMX),
            ``16-mixed`` on older CUDA devices, ``32-true`` elsewhere. The choice and its reason are
            printed at start-up.
        channels_last: NHWC weights and activations for the modules that support them (every
            defense, the victim trainers): ``auto`` turns it on where it was measured to pay, on
            CPUs (fp32 and bf16) and on GPUs with 16-bit precision.
        **kwargs: the other arguments of :class:`lightning.Trainer`.
    """

    def __init__(
        self,
        *,
        precision: _PRECISION_INPUT | Literal["auto"] | None = "auto",
        channels_last: bool | Literal["auto"] = "auto",
        **kwargs: Any,
    ) -> None:
        choice = None
        plugins = kwargs.get("plugins")
        plugins = plugins if isinstance(plugins, list | tuple) else [plugins]
        if precision == "auto" and any(isinstance(p, Precision) for p in plugins):
            precision = None  # a precision plugin decides; Lightning refuses both
        elif precision == "auto":
            devices = kwargs.get("devices", "auto")
            index = int(devices[0]) if isinstance(devices, list | tuple) and devices else 0
            # forking strategies need CUDA uninitialized in this process until the ranks exist
            forks = any(word in str(kwargs.get("strategy", "")) for word in ("fork", "notebook"))
            choice = auto_precision(device_type(kwargs.get("accelerator", "auto")), index, fork_safe=forks)
            precision = choice.precision
        super().__init__(precision=precision, **kwargs)
        self.channels_last = uses_channels_last(self) if channels_last == "auto" else channels_last
        layout = f"channels_last {'on' if self.channels_last else 'off'}"
        if choice is not None:
            rank_zero_info(f"Precision auto -> {self.precision}: {choice.reason}; {layout}.")
        elif channels_last == "auto":
            rank_zero_info(f"Precision {self.precision} (given); {layout}.")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to ``<name>.partial`` beside it, flush it to disk, then rename it over
    the old one, so a run killed mid-write (or a full disk) leaves the previous checkpoint whole.
    Read every checkpoint with :func:`load_weights`, whatever ``weights_only`` Lightning asks for.

    Lightning's own writer stages through the system's temporary folder and *moves* the file,
    which is a copy, not a rename, when that folder is on another file system.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's fsspec writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        try:
            with partial.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not is_url(path) and not get_filesystem(path).exists(str(path)):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        checkpoint = load_weights(path, map_location="cpu" if map_location is None else map_location)
        check_checkpoint(checkpoint, path)
        return checkpoint
