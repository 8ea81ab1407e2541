"""The ``lightning`` / ``lightning-defense`` command: LightningCLI over every module and DataModule.

Model and data are given in subclass mode (``class_path``/``init_args``); importing the package
registers every LightningModule and DataModule, so short class names resolve.
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Any

from jsonargparse import lazy_instance
from lightning import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

import lightning_defense  # noqa: F401  (registers modules, DataModules and attacks)
from lightning_defense.callbacks import EpochSummary
from lightning_defense.errors import UntrustedCheckpointError, UserInputError


class DefenseCLI(LightningCLI):
    """LightningCLI with the project's defaults: seed 0, rich progress bar, CSV logs under
    ``runs/``, and a checkpoint callback that writes ``last.ckpt`` after every training epoch."""

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # the rich bar is a default, not an order: `enable_progress_bar: false` or another bar wins
        given = [*callbacks, *(config.get("callbacks") or [])]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, RichProgressBar()]
        if not sys.stdout.isatty() and not any(isinstance(c, EpochSummary) for c in given):
            callbacks = [*callbacks, EpochSummary()]  # a log file gets a line per epoch instead
        return super()._instantiate_trainer(config, callbacks)

    def _load_weights_only(self) -> None:
        """Contract 3: `--ckpt_path` is read with `weights_only=True`, whatever the config says
        (Lightning would unpickle a remote checkpoint by default)."""
        config = self.config_init[self.subcommand]
        if config.get("weights_only") is False:
            raise UntrustedCheckpointError(
                "`weights_only: false` would unpickle the checkpoint, which can run arbitrary code; "
                "lightning-defense only loads weights. Remove the option."
            )
        if "weights_only" in config:
            config["weights_only"] = True

    before_fit = before_validate = before_test = before_predict = _load_weights_only


def main(args: list[str] | None = None) -> None:
    """Console-script entry point; returns None so the script exits 0 on success.

    Errors in the user's input end the program with their message alone and exit code 2.
    """
    try:
        _run(args)
    except pickle.UnpicklingError:
        if os.environ.get("LIGHTNING_DEFENSE_TRACEBACK"):
            raise
        print(
            "error: the checkpoint holds pickled Python objects and was refused: unpickling it could run "
            "arbitrary code (contract 3). Use a checkpoint written by lightning-defense, or re-save the "
            "weights as a state dict or safetensors file.",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    except Exception as err:
        cause = _user_error(err)
        if cause is None or os.environ.get("LIGHTNING_DEFENSE_TRACEBACK"):
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


def _user_error(err: BaseException | None) -> UserInputError | None:
    """Our own input error behind ``err``: jsonargparse wraps those raised while instantiating."""
    while err is not None:
        if isinstance(err, UserInputError):
            return err
        err = err.__cause__ or err.__context__
    return None


def _run(args: list[str] | None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["study"]:  # a grid of fit runs (lightning_defense.study), beside Lightning's subcommands
        from lightning_defense.study import main as study

        study(argv[1:])
        return
    DefenseCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            # every training epoch, also in configs that validate every n epochs (Lightning would then
            # save only after validation, and an interruption could lose n epochs)
            "callbacks": [ModelCheckpoint(save_last=True, save_on_train_epoch_end=True)],
            "logger": lazy_instance(CSVLogger, save_dir="runs"),
        },
        args=args,
    )


if __name__ == "__main__":
    main()
