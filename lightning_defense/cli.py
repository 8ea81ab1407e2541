"""The ``lightning`` / ``lightning-defense`` command: LightningCLI over every module and DataModule.

Model and data are given in subclass mode (``class_path``/``init_args``); importing the package
registers every LightningModule and DataModule, so short class names resolve.
"""

from __future__ import annotations

from jsonargparse import lazy_instance
from lightning import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

import lightning_defense  # noqa: F401  (registers modules, DataModules and attacks)


class DefenseCLI(LightningCLI):
    """LightningCLI with the project's defaults: seed 0, rich progress bar, CSV logs under
    ``runs/``, and a checkpoint callback that always keeps ``last.ckpt``."""


def main(args: list[str] | None = None) -> None:
    """Console-script entry point; returns None so the script exits 0 on success."""
    DefenseCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "callbacks": [RichProgressBar(), ModelCheckpoint(save_last=True)],
            "logger": lazy_instance(CSVLogger, save_dir="runs"),
        },
        args=args,
    )


if __name__ == "__main__":
    main()
