"""Where a run writes, and the rules that keep earlier runs' files: a run without a logger still
gets its own folder, a fresh run never writes into a folder holding another run's checkpoints,
``--ckpt_path last`` finds the newest ``last.ckpt`` of the run name, and ``config.yaml`` is never
overwritten."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs rely on distinct folders
    fcntl = None

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback

from lightning_defense.errors import ConfigurationError, InputNotFoundError

#: the folder of runs without a logger: ``runs/no_logger/version_N``
NO_LOGGER_ROOT = Path("runs", "no_logger")


def run_folder(trainer: Trainer) -> Path:
    """The run's folder (the logger's version folder). Under DDP ``trainer.log_dir`` broadcasts
    from rank 0, so every rank must call this, before any ``is_global_zero`` branch."""
    return Path(trainer.log_dir or trainer.default_root_dir)


#: passes a run folder chosen by rank 0 to the DDP ranks Lightning starts (they rerun the command)
RUN_DIR_VARIABLE = "LIGHTNING_DEFENSE_RUN_DIR"


def _is_launched_rank() -> bool:
    """A process that another one started or that is not global rank 0 (DDP)."""
    return any(int(os.environ.get(name, "0") or 0) > 0 for name in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


def _next_version(root: Path) -> int:
    versions = [int(m.group(1)) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return max(versions, default=-1) + 1


def no_logger_run_dir() -> Path:
    """A new ``runs/no_logger/version_N`` for a run with ``logger: false`` (reserved with mkdir, so
    two runs started together get two folders). Ranks that Lightning starts take rank 0's folder."""
    given = os.environ.get(RUN_DIR_VARIABLE)
    if given and _is_launched_rank():
        return Path(given)
    while True:
        folder = NO_LOGGER_ROOT / f"version_{_next_version(NO_LOGGER_ROOT)}"
        if _is_launched_rank():  # rank 0 decides (Lightning broadcasts its folder): create nothing here
            return folder
        try:
            folder.mkdir(parents=True)
        except FileExistsError:
            continue
        os.environ[RUN_DIR_VARIABLE] = str(folder)
        return folder


def checkpoint_folder(trainer: Trainer, callback: ModelCheckpoint) -> Path:
    """The folder ``callback`` will write to, by Lightning's own rule (its ``dirpath``, else the
    logger's version folder, else ``default_root_dir``, each + ``checkpoints``)."""
    resolve = getattr(callback, "_ModelCheckpoint__resolve_ckpt_dir", None)
    if resolve is not None:
        return Path(resolve(trainer))
    return run_folder(trainer) / "checkpoints"


def _checkpoints_in(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.ckpt")) if folder.is_dir() else []


def resolve_last_checkpoint(trainer: Trainer) -> Path | None:
    """``--ckpt_path last``: the newest ``last*.ckpt`` in this run's checkpoint folder, else in the
    checkpoint folders of the run name's other versions (a resumed or restarted run gets a new
    version folder, where Lightning alone would find nothing and start from scratch). None when the
    run has no checkpoint callback; an error naming where it looked when there is none."""
    callbacks = trainer.checkpoint_callbacks
    if not callbacks:
        return None
    own = checkpoint_folder(trainer, callbacks[0])
    pattern = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}*{ModelCheckpoint.FILE_EXTENSION}"
    found = sorted(own.glob(pattern)) if own.is_dir() else []
    searched = str(own)
    if not found and callbacks[0].dirpath is None and own.name == "checkpoints":
        root = own.parent.parent  # <save_dir>/<name>: the run name's version folders
        found = sorted(root.glob(f"*/checkpoints/{pattern}"))
        searched = str(root / "*" / "checkpoints")
    if not found:
        raise InputNotFoundError(
            f"--ckpt_path last: no {pattern} in {searched}, so there is nothing to resume. Give the checkpoint's "
            "path (--ckpt_path <run folder>/checkpoints/last.ckpt), the same logger save_dir and name as the run "
            "that wrote it, or leave out --ckpt_path to start over."
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def check_fresh_folder(trainer: Trainer, ckpt_path: str | os.PathLike | None) -> None:
    """A run writes its checkpoints only into a folder without another run's: Lightning would add
    ``last-v1.ckpt`` beside the old ``last.ckpt`` (and ``--ckpt_path last`` would pick either)."""
    for callback in trainer.checkpoint_callbacks:
        folder = checkpoint_folder(trainer, callback)
        existing = _checkpoints_in(folder)
        resuming_here = ckpt_path is not None and Path(str(ckpt_path)).resolve().parent == folder.resolve()
        if existing and not resuming_here:
            names = ", ".join(p.name for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
            raise ConfigurationError(
                f"{folder} already holds checkpoints of another run ({names}). Resume that run with "
                f"--ckpt_path {folder / existing[0].name if len(existing) == 1 else folder / 'last.ckpt'}, or give "
                "this run its own folder: leave trainer.logger.init_args.version unset (each run gets a new "
                "version_N) or choose another version, name or save_dir."
            )


#: lock files held until the process ends (the OS releases them then, also on a kill)
_HELD_LOCKS: list = []


def claim_run_folder(trainer: Trainer, automatic_version: bool) -> Path:
    """Lock the run folder for this run, so that two runs started together do not write into the
    same folder (they would compute the same next version, or share a fixed one). With an automatic
    version the logger moves on to the next free one; a fixed version held by another run is an
    error. Only rank 0 locks: the other ranks write through it."""
    folder = run_folder(trainer)
    if _is_launched_rank() or fcntl is None:
        return folder
    for _ in range(1000):
        # the folder itself stays empty (the logger warns about a non-empty one): the lock sits beside it,
        # and the folder's existence moves the next run's automatic version on
        folder.mkdir(parents=True, exist_ok=True)
        handle = (folder.parent / f".{folder.name}.lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            if not automatic_version:
                raise ConfigurationError(
                    f"Another run is writing into {folder} right now. Wait for it, or give this run its own folder: "
                    "leave trainer.logger.init_args.version unset or choose another version, name or save_dir."
                ) from None
            trainer.logger._version = None  # the next free version: the folder exists now
            folder = Path(trainer.log_dir)
            continue
        _HELD_LOCKS.append(handle)
        return folder
    raise ConfigurationError(f"Could not find a free run folder beside {folder}.")


def release_run_folders() -> None:
    """Let go of the run folders this process claimed (its run is over)."""
    while _HELD_LOCKS:
        _HELD_LOCKS.pop().close()


def check_writable(folder: Path) -> None:
    """Fail at start-up, naming the folder, when the run could not write its files (a read-only
    disk or folder), instead of after the first epoch."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ConfigurationError(
            f"The run cannot write into {folder} ({err.strerror or err} at {existing}). Point the run at a "
            "writable folder: trainer.logger.init_args.save_dir (or trainer.default_root_dir without a logger)."
        ) from err


class KeepConfigCallback(SaveConfigCallback):
    """Saves the run's config as Lightning does, but never over an earlier one: a run resumed in its
    own folder writes ``config-v1.yaml`` (then ``-v2``...) beside the ``config.yaml`` that started it."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir:
            folder = run_folder(trainer)  # broadcasts: every rank calls it
            name = self.config_filename
            if trainer.is_global_zero:
                stem, suffix = os.path.splitext(self.config_filename)
                version = 0
                while (folder / name).exists():
                    version += 1
                    name = f"{stem}-v{version}{suffix}"
            self.config_filename = trainer.strategy.broadcast(name)
        super().setup(trainer, pl_module, stage)
