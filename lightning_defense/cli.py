"""The ``lightning`` / ``lightning-defense`` command: LightningCLI over every module and DataModule.

Model and data are given in subclass mode (``class_path``/``init_args``); this module imports every
LightningModule, DataModule, attack and callback of the package, so short class names resolve.

Its length: beside the LightningCLI subclass, every way a run can go wrong before it starts
(a missing or foreign checkpoint, a taken run folder, a config error) becomes one line and exit
status 2 here, in one place.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import pickle
import re
import signal
import sys
import zipfile
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError, lazy_instance
from lightning import Callback, LightningDataModule, LightningModule, Trainer
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from lightning_defense.errors import ConfigurationError, InputNotFoundError, UntrustedCheckpointError, UserInputError
from lightning_defense.io.run_folder import (
    KeepConfigCallback,
    check_fresh_folder,
    check_writable,
    claim_run_folder,
    no_logger_run_dir,
    release_run_folders,
    resolve_last_checkpoint,
    run_folder,
)
from lightning_defense.io.shipped import config_path
from lightning_defense.io.torch_files import check_checkpoint, imported_object, load_weights
from lightning_defense.lazy import import_all
from lightning_defense.training.callbacks import (
    EpochMetricsFile,
    EpochSummary,
    RandomStateCheckpoint,
    StopOnNonFiniteLoss,
)
from lightning_defense.training.hardware import configure_threads
from lightning_defense.training.trainer import AtomicCheckpointIO, DefenseTrainer
from lightning_defense.victims.architectures import allow_network
from lightning_defense.victims.victim_file import check_same_victim

import_all(
    "lightning_defense",
    "lightning_defense.attacks",
    "lightning_defense.data",
    "lightning_defense.defenses",
    "lightning_defense.victims",
)

# `ckpt_path` values that Lightning resolves itself
SPECIAL_CHECKPOINTS = ("last", "best", "hpc", "registry")


def check_checkpoint_file(path: Path) -> None:
    """A checkpoint to resume from must exist and be a whole torch file (a zip archive: a file cut
    short by a crash or a full disk has lost its central directory)."""
    if path.is_dir():
        raise InputNotFoundError(
            f"Checkpoint {str(path)!r} is a folder: give the checkpoint file in it (e.g. {path / 'last.ckpt'})."
        )
    if not path.is_file():
        raise InputNotFoundError(
            f"Checkpoint {str(path)!r} does not exist. To resume a run, pass its checkpoints/last.ckpt "
            "(or `--ckpt_path last` with the same logger settings); to start over, leave out --ckpt_path."
        )
    with path.open("rb") as f:
        head = f.read(16)
    if len(head) == 16 and head[8:9] == b"{" and not zipfile.is_zipfile(path):  # 8-byte length, then a JSON header
        raise UntrustedCheckpointError(
            f"{str(path)!r} is a safetensors file (a victim or an export), not a checkpoint of a run: a victim goes in "
            "model.init_args.victim; --ckpt_path takes a run's checkpoints/last.ckpt."
        )
    if not zipfile.is_zipfile(path):
        raise UntrustedCheckpointError(
            f"Checkpoint {str(path)!r} is damaged or truncated (not a complete torch checkpoint). Resume from "
            "another checkpoint of the run (its checkpoints/ folder) or start over without --ckpt_path."
        )


def _names_class(recorded: str, configured: str | None) -> bool:
    """Whether a checkpoint's recorded class path names the configured class. Only modules already
    imported are looked in: a path read from a file never imports anything."""
    if configured is None:
        return False
    if recorded == configured:
        return True
    target = imported_object(configured)
    return target is not None and imported_object(recorded) is target


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


class DefenseCLI(LightningCLI):
    """LightningCLI with the project's defaults: seed 0, rich progress bar, CSV logs under
    ``runs/``, a checkpoint callback that writes ``last.ckpt`` after every training epoch, and
    :class:`~lightning_defense.training.trainer.DefenseTrainer` (precision and memory layout from the
    hardware) with CPU threads shared out between the run's processes."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--victim_networks",
            type=list[str],
            default=[],
            help="Import paths of your own nn.Module classes that victim files may name as their arch "
            "(e.g. [mypackage.nets.MyNet]); a file alone never chooses a class to import.",
        )

    def before_instantiate_classes(self) -> None:
        """Own network classes the config allows are allowed before any victim loads; the victim
        is given once (contract 2): a defense's data without a victim or an attack of its own
        evaluates the model's victim (``model.init_args.victim``)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        for class_path in config.get("victim_networks") or []:
            allow_network(class_path)
        victim = config.get("model.init_args.victim")
        data = config.get("data.init_args")
        if not isinstance(victim, str) or data is None or "victim" not in data or "attack" not in data:
            return
        if data.get("victim") is None and data.get("attack") is None:
            config["data.init_args.victim"] = victim

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # the rich bar is a default, not an order: `enable_progress_bar: false` or another bar wins
        given = [*callbacks, *(config.get("callbacks") or [])]
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks = [*callbacks, RichProgressBar()]
        if not sys.stdout.isatty() and not any(isinstance(c, EpochSummary) for c in given):
            callbacks = [*callbacks, EpochSummary()]  # a log file gets a line per epoch instead
        for default in (StopOnNonFiniteLoss, RandomStateCheckpoint, EpochMetricsFile):
            if not any(isinstance(c, default) for c in given):
                callbacks = [*callbacks, default()]
        callbacks = self._checkpoint_callback(config, given, callbacks)
        no_logger = config.get("logger") in (False, []) or config.get("fast_dev_run")  # fast_dev_run drops loggers
        if no_logger and config.get("default_root_dir") is None:
            # Lightning would write config.yaml and checkpoints/ into the working directory
            self._no_logger_dir = getattr(self, "_no_logger_dir", None) or no_logger_run_dir()
            config = {**config, "default_root_dir": str(self._no_logger_dir)}
            rank_zero_info(f"No logger: the run's files go to {self._no_logger_dir}.")
        # added here, not as a trainer default: a default instance would not survive --print_config,
        # and a config's own `plugins` would silently drop it
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config = {**config, "plugins": [*plugins, AtomicCheckpointIO()]}
        trainer = super()._instantiate_trainer(config, callbacks)
        # DDP ranks that Lightning starts on this machine share its cores; ranks started by SLURM or
        # torchrun already come with their own share (CPU binding, OMP_NUM_THREADS)
        environment = getattr(trainer.strategy, "cluster_environment", None)
        external = getattr(environment, "creates_processes_externally", False)
        processes = trainer.num_devices if isinstance(trainer.strategy, ParallelStrategy) and not external else 1
        threads = configure_threads(processes)
        rank_zero_info(f"CPU threads: {threads.threads} per process ({threads.reason}).")
        if threads.warning:
            rank_zero_warn(threads.warning)
        return trainer

    @staticmethod
    def _checkpoint_callback(
        config: dict[str, Any], given: list[Callback], callbacks: list[Callback]
    ) -> list[Callback]:
        """Add a ModelCheckpoint that writes ``last.ckpt`` after every training epoch (also in configs
        that validate every n epochs: Lightning would save only after validation, and an interruption
        could lose n epochs), unless the config brings its own or turns checkpointing off. Added
        here, not as a trainer default, because a config's own `callbacks` list replaces defaults."""
        own = any(isinstance(c, ModelCheckpoint) for c in given)
        if config.get("enable_checkpointing") is False:
            if own:
                raise ConfigurationError(
                    "trainer.enable_checkpointing is false but trainer.callbacks holds a ModelCheckpoint: "
                    "remove one of the two."
                )
            rank_zero_warn(
                "enable_checkpointing: false: no checkpoint is written, an interrupted run cannot be resumed."
            )
            return callbacks
        if own:
            return callbacks
        return [*callbacks, ModelCheckpoint(save_last=True, save_on_train_epoch_end=True)]

    def _resolve_last_checkpoint(self) -> None:
        """``--ckpt_path last``: the newest ``last.ckpt`` of the run name across its version folders
        (Lightning looks only in this run's new, empty one), then as for a path given by hand: the
        checkpoint's model settings, and the classes built anew with them."""
        if self.config_init[self.subcommand].get("ckpt_path") != "last":
            return
        found = resolve_last_checkpoint(self.trainer)
        if found is not None:
            rank_zero_info(f"--ckpt_path last: resuming from {found}.")
            self.config[self.subcommand]["ckpt_path"] = str(found)
            self._parse_ckpt_path()
            self._set_seed()
            self.instantiate_classes()

    def _prepare_run_folder(self, fit: bool) -> None:
        """Check that the run folder can be written; a fit claims it and refuses another run's checkpoints."""
        logger = self.trainer.logger
        automatic_version = logger is not None and getattr(logger, "_version", 0) is None  # before log_dir fixes it
        check_writable(run_folder(self.trainer))
        if fit:
            claim_run_folder(self.trainer, automatic_version)
            check_fresh_folder(self.trainer, self.config_init[self.subcommand].get("ckpt_path"))

    def _parse_ckpt_path(self) -> None:
        """Check the checkpoint before Lightning reads it, take the model's settings from it as
        LightningCLI does on resume, and say which settings of this command it overrides.

        The checkpoint is untrusted data: it is read with :func:`load_weights`, its recorded class
        (``_class_path``) must be the config's model class and is never imported, and a checkpoint
        of another victim is refused (contract 3)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or str(ckpt_path).split(":")[0] in SPECIAL_CHECKPOINTS:
            return  # resolved by Lightning and read through AtomicCheckpointIO; DefenseModule checks the victim
        local = str(ckpt_path).removeprefix("file://")
        if "://" not in local:
            check_checkpoint_file(Path(local))
        checkpoint = load_weights(ckpt_path)
        hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
        if not isinstance(checkpoint, dict) or not isinstance(hparams, dict | None):
            raise UntrustedCheckpointError(
                f"Checkpoint {str(ckpt_path)!r} is not a Lightning checkpoint (no dict of hyper_parameters). Resume "
                "from a checkpoint a run of lightning-defense wrote, or start over without --ckpt_path."
            )
        check_checkpoint(checkpoint, ckpt_path)
        hparams = dict(hparams or {})
        hparams.pop("_instantiator", None)
        model = self.config[subcommand].get("model")
        configured = model.get("class_path") if model is not None else None
        recorded = hparams.pop("_class_path", None)
        if recorded is not None and not (isinstance(recorded, str) and _names_class(recorded, configured)):
            raise UntrustedCheckpointError(
                f"Checkpoint {str(ckpt_path)!r} was written by {str(recorded)[:200]!r}, but the config's model is "
                f"{configured!r}. Resume with the config of the run that wrote it, or start over without --ckpt_path."
            )
        check_same_victim(hparams.get("victim"), (model.get("init_args") or {}).get("victim"), ckpt_path)
        if not hparams:
            return
        given = _flatten(model, "model.")
        stored = {"class_path": configured, "init_args": hparams}
        try:
            self.config = self.parser.parse_object({subcommand: {"model": stored}}, self.config)
        except ArgumentError as err:
            raise UntrustedCheckpointError(
                f"Checkpoint {str(ckpt_path)!r}: its hyper_parameters do not fit {configured} "
                f"({_shorten(config_error_message(str(err)).splitlines()[0])}). The file was altered or written by "
                "another version; resume from another checkpoint of the run, or start over without --ckpt_path."
            ) from None
        used = _flatten(self.config[subcommand].get("model"), "model.")
        changed = [f"{k}: {given[k]!r} -> {used[k]!r}" for k in sorted(given) if k in used and given[k] != used[k]]
        if changed:
            rank_zero_warn(
                f"Resuming from {ckpt_path}: the checkpoint's model settings replace these of the command "
                f"(given -> used): {'; '.join(changed)}. Start a new run (no --ckpt_path) to change them."
            )

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

    def _check_learning_rates(self) -> None:
        """A learning rate that is not positive trains nothing (or backwards): refused before fit,
        with the option that sets it."""
        rates = {
            key: value
            for key, value in _flatten(self.config_init[self.subcommand].get("optimizer"), "optimizer.").items()
            if key.endswith("init_args.lr")
        }
        hparams = getattr(self.model, "hparams", {})
        rates |= {f"model.init_args.{k}": v for k, v in hparams.items() if k == "lr" or k.endswith("_lr")}
        bad = [f"{key}: {value}" for key, value in rates.items() if isinstance(value, int | float) and not value > 0]
        if bad:
            raise ConfigurationError(
                f"Learning rates must be positive, got {'; '.join(bad)}. Set each to a value > 0 "
                "(`--print_config` shows the defaults)."
            )

    def before_fit(self) -> None:
        self._resolve_last_checkpoint()
        self._load_weights_only()
        self._check_learning_rates()
        self._prepare_run_folder(fit=True)

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        finally:
            release_run_folders()

    def _before_evaluation(self) -> None:
        self._resolve_last_checkpoint()
        self._load_weights_only()
        self._prepare_run_folder(fit=False)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if self.config_init[self.subcommand].get("ckpt_path") is None and trainable:
            rank_zero_warn(
                f"`lightning {self.subcommand}` without --ckpt_path evaluates {type(self.model).__name__} as built, "
                f"its {trainable:,} trainable parameters untrained. To evaluate a run, pass its checkpoint "
                "(--ckpt_path <run folder>/checkpoints/last.ckpt, or last)."
            )

    before_validate = before_test = before_predict = _before_evaluation


def main(args: list[str] | None = None) -> None:
    """Console-script entry point; returns None so the script exits 0 on success.

    Errors in the user's input end the program with their message alone and exit code 2.
    """
    try:
        _run(args)
    except SIGTERMException:  # Lightning stops cleanly on SIGTERM and would exit 0, as if the run had ended
        print(
            "error: stopped by SIGTERM before the run ended; its last.ckpt resumes it (same command with "
            "`--ckpt_path last`).",
            file=sys.stderr,
        )
        raise SystemExit(128 + signal.SIGTERM) from None
    except ArgumentError as err:  # a malformed config: jsonargparse's message without its usage wall
        if os.environ.get("LIGHTNING_DEFENSE_TRACEBACK"):
            raise
        command = next((a for a in (sys.argv[1:] if args is None else args) if not a.startswith("-")), "fit")
        print(f"error: {_shorten(config_error_message(str(err), command))}", file=sys.stderr)
        raise SystemExit(2) from None
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
        print(f"error: {_shorten(cause)}", file=sys.stderr)
        raise SystemExit(2) from None


_NOISE = ("Does not validate against any of", "Subtypes:", "Errors:", "Expected a <class 'NoneType'>", "Given value")


def _known_classes(base: type) -> list[str]:
    found, stack = set(), [base]
    while stack:
        for sub in stack.pop().__subclasses__():
            stack.append(sub)
            abstract = any(getattr(inspect.getattr_static(sub, n), "__isabstractmethod__", False) for n in dir(sub))
            if sub.__module__.startswith("lightning_defense") and not abstract:
                found.add(sub.__name__)
    return sorted(found)


def config_error_message(message: str, command: str = "fit") -> str:
    """jsonargparse's error without the type-union noise; an unknown class name gets the known ones."""
    lines = [line for line in message.splitlines() if line.strip(" -") and not line.strip(" -").startswith(_NOISE)]
    text = "\n".join(lines)
    unknown = re.search(r"Expected a dot import path string: (\S+)", text)
    if unknown:
        key = re.search(r'Parser key "(\w+)"', text)
        base = {"model": LightningModule, "data": LightningDataModule}.get(key.group(1) if key else "")
        known = f": use one of {', '.join(_known_classes(base))}" if base else ""
        text = text.replace(unknown.group(0), f"{unknown.group(1)!r} is not a class lightning-defense knows{known}")
    return text + f"\n`lightning {command} --help` lists the options; `--print_config` shows the config as parsed."


MAX_MESSAGE = 2000


def _shorten(message: object) -> str:
    """A message cut to :data:`MAX_MESSAGE` characters (a value read from a file can be megabytes)."""
    text = str(message)
    return (
        text if len(text) <= MAX_MESSAGE else f"{text[:MAX_MESSAGE]} ... ({len(text) - MAX_MESSAGE:,} characters cut)"
    )


def _user_error(err: BaseException | None) -> UserInputError | None:
    """The user's input error behind ``err``: ours (jsonargparse wraps those raised while
    instantiating), a full disk, or a checkpoint whose weights do not fit the model."""
    latest = UserInputError.latest
    while err is not None:
        if isinstance(err, UserInputError):
            return err
        if latest is not None and isinstance(err, ValueError) and str(latest).splitlines()[0] in str(err):
            return latest  # ours, as text inside an older jsonargparse's union error
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            where = f" while writing {err.filename}" if err.filename else ""
            return UserInputError(
                f"No space left on the device{where}. Free some space, or point the run folder at another "
                "disk (trainer.logger.init_args.save_dir); checkpoints are written atomically, so the last "
                "complete one is intact: resume from it with --ckpt_path."
            )
        if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            where = f" {err.filename}" if err.filename else ""
            return UserInputError(
                f"Cannot access{where}: {err.strerror}. Give the run a folder it may write (the logger's "
                "save_dir, or trainer.default_root_dir without a logger) and data it may read."
            )
        if isinstance(err, MisconfigurationException):  # Lightning's own word for a bad Trainer setting
            return UserInputError(f"{err} (`lightning fit --help` lists the trainer options.)")
        if isinstance(err, ValueError) and "ckpt_path=" in str(err):  # e.g. `best` without a monitored metric
            return UserInputError(f"{err} Give the checkpoint's path instead.")
        if isinstance(err, ValueError) and "loaded state dict" in str(err) and "group" in str(err):
            return UserInputError(
                f"The checkpoint's optimizer state does not fit this model's optimizer ({err}): it was written with "
                "other trainable parts or another optimizer. Resume with the config of the run that wrote it."
            )
        if isinstance(err, RuntimeError) and "Error(s) in loading state_dict" in str(err):
            detail = " ".join(line.strip() for line in str(err).splitlines()[1:3] if line.strip())[:400]
            return UserInputError(
                f"The checkpoint's weights do not fit this model ({detail}): it was trained with another "
                "class count, input or architecture. Use a checkpoint of this configuration, or the matching "
                "model and data."
            )
        err = err.__cause__ or err.__context__
    return None


DESCRIPTION = (
    "lightning-defense: defend image classifiers against backdoors. Lightning's subcommands train a victim "
    "(VictimTask) or a defense on a frozen victim (REFINE, BTI-DBF, FT/FST, T-MR; BDMAE and ShrinkPad "
    "with validate/test) from YAML configs, e.g. `lightning fit --config configs/refine.yaml`."
)
EPILOG = (
    "More subcommands: `study` runs the auxiliary-data study grid (`lightning study --help`); `wrap` turns a "
    "third party's weights into a victim file (`lightning wrap --help`); `shipped` lists the victims and "
    "(`--configs`) the configs that ship with the package, which `--config <name>` finds from any folder "
    "(e.g. `--config refine`); `features` is `validate` drawing the penultimate features of clean and "
    "poisoned test images (t-SNE, `lightning features --help`). `--version` prints the versions."
)


def version() -> str:
    """This package's version, with the torch and Lightning it runs on."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    import lightning
    import torch

    try:
        own = installed("lightning-defense")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from lightning_defense import __version__ as own
    return f"lightning-defense {own} (torch {torch.__version__}, lightning {lightning.__version__})"


def with_shipped_configs(argv: list[str]) -> list[str]:
    """``--config refine`` -> the shipped ``configs/refine.yaml`` where no such file is here
    (:func:`lightning_defense.io.shipped.config_path`)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = config_path(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + config_path(arg.removeprefix("--config="))
    return out


def _run(args: list[str] | None) -> None:
    argv = with_shipped_configs(sys.argv[1:] if args is None else args)
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself
    else:
        args = argv
    if argv[:1] in (["--version"], ["-V"]):
        print(version())
        return
    if argv[:1] == ["shipped"]:  # the shipped victims (with their SHA-256 and measured metrics) and configs
        from lightning_defense.io.shipped import main as shipped

        shipped(argv[1:])
        return
    if argv[:1] == ["study"]:  # a grid of fit runs (lightning_defense.study), beside Lightning's subcommands
        from lightning_defense.study import main as study

        study(argv[1:])
        return
    if argv[:1] == ["features"]:  # `validate` with a FeatureView: the feature view of a victim or defense
        argv = features_command(argv[1:])
        if args is None:
            sys.argv[1:] = argv
        else:
            args = argv
    if argv[:1] == ["wrap"]:  # a third party's weights into a victim file (lightning_defense.victims.wrap)
        from lightning_defense.victims.wrap import main as wrap

        wrap(argv[1:])
        return
    build_cli(args)


FEATURES_HELP = (
    "usage: lightning features --config CONFIG [--ckpt_path CKPT] [--num_images N] [--method {tsne,pca}] "
    "[any option of `lightning validate`]\n\n"
    "`lightning validate` with a FeatureView callback: embeds the penultimate features of clean and poisoned "
    "test images (for a defense: the victim's beside the defended model's) and writes "
    "features/validate_<method>.png in the run folder. --num_images: images from each test set (500); "
    "--method: tsne (default) or pca. Give the trained defense's checkpoint with --ckpt_path."
)


def features_command(argv: list[str]) -> list[str]:
    """``lightning features ...`` as the ``validate`` command it stands for."""
    import argparse

    if argv[:1] in (["--help"], ["-h"]):
        print(FEATURES_HELP)
        raise SystemExit(0)
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--num_images", type=int, default=500)
    parser.add_argument("--method", default="tsne")
    view, rest = parser.parse_known_args(argv)
    if view.method not in ("tsne", "pca"):  # said here: the parser's message for a callback's Literal is obscure
        raise ConfigurationError(f"--method must be 'tsne' or 'pca', got {view.method!r}.")
    callback = {"class_path": "FeatureView", "init_args": {"num_images": view.num_images, "method": view.method}}
    return ["validate", *rest, f"--trainer.callbacks+={json.dumps(callback)}"]


def build_cli(args: list[str] | None, run: bool = True) -> DefenseCLI:
    """The CLI with the project's defaults; ``run=False`` only instantiates (for tests)."""
    return DefenseCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=DefenseTrainer,
        seed_everything_default=0,
        save_config_callback=KeepConfigCallback,
        # main() prints config errors without the usage wall
        parser_kwargs={"exit_on_error": False, "description": DESCRIPTION, "epilog": EPILOG},
        trainer_defaults={
            "logger": lazy_instance(CSVLogger, save_dir="runs"),
        },
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
