"""Bad input and interrupted runs: one clear message, nothing lost (issue 6)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_defense.cli import _user_error, config_error_message
from lightning_defense.data import DefenseDataModule, SeenData, SyntheticDataModule
from lightning_defense.errors import ConfigurationError

#: run again on the lowest versions pyproject.toml allows (`nox -s lowest`, .ci/run)
pytestmark = pytest.mark.trust_boundary


def tiny_config(tmp_path: Path, **model_args) -> Path:
    config = {
        "seed_everything": 0,
        "model": {"class_path": "VictimTask", "init_args": {"arch": "resnet20", "num_classes": 10, **model_args}},
        "data": {
            "class_path": "SyntheticDataModule",
            "init_args": {
                "train_per_class": 8,
                "test_per_class": 4,
                "batch_size": 16,
                "attack": {"class_path": "BadNets", "init_args": {"target": 1, "poison_rate": 0.2}},
            },
        },
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": "tiny"}},
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def lightning(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "LIGHTNING_DEFENSE_TRACEBACK": ""}
    command = [sys.executable, "-m", "lightning_defense", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_clear_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr[-2000:]


def test_missing_and_truncated_checkpoints_are_named_with_the_fix(tmp_path):
    config = str(tiny_config(tmp_path))
    one_clear_error(
        lightning("fit", "--config", config, "--ckpt_path", str(tmp_path / "gone.ckpt"), cwd=tmp_path),
        "gone.ckpt' does not exist",
        "last.ckpt",
    )
    assert lightning("fit", "--config", config, cwd=tmp_path).returncode == 0
    last = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a write cut short
    one_clear_error(
        lightning("fit", "--config", config, "--ckpt_path", str(truncated), cwd=tmp_path),
        "is damaged or truncated",
    )


def test_a_checkpoint_of_another_class_count_is_refused_with_the_reason(tmp_path):
    config = str(tiny_config(tmp_path))
    assert lightning("fit", "--config", config, cwd=tmp_path).returncode == 0
    last = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    head = next(k for k in checkpoint["state_dict"] if k.endswith("fc.weight"))  # a 43-class head
    checkpoint["state_dict"][head] = torch.zeros(43, 64)
    checkpoint["state_dict"][head.replace("weight", "bias")] = torch.zeros(43)
    other = tmp_path / "other.ckpt"
    torch.save(checkpoint, other)
    one_clear_error(
        lightning("test", "--config", config, "--ckpt_path", str(other), cwd=tmp_path),
        "do not fit this model",
        "fc.weight",
    )


def test_an_unknown_class_in_a_config_names_the_known_ones(tmp_path):
    result = lightning("fit", "--config", str(tiny_config(tmp_path)), "--model.class_path", "REFIN", cwd=tmp_path)
    one_clear_error(result, "'REFIN' is not a class lightning-defense knows", "REFINE", "FineTune")
    assert "NoneType" not in result.stderr
    misspelt = lightning("fit", "--config", str(tiny_config(tmp_path)), "--model.init_args.arhc", "x", cwd=tmp_path)
    one_clear_error(misspelt, "'arhc'", "`lightning fit --help` lists the options")  # jsonargparse words the rest


def test_a_diverging_run_stops_at_once_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = str(tiny_config(tmp_path))
    assert lightning("fit", "--config", config, cwd=tmp_path).returncode == 0
    last = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    # resume the finished run for another epoch with a learning rate that blows up
    state = torch.load(last, weights_only=True)
    state["optimizer_states"][0]["param_groups"][0]["lr"] = 1e30
    torch.save(state, last)
    good = last.read_bytes()
    result = lightning("fit", "--config", config, "--ckpt_path", str(last), "--trainer.max_epochs", "2", cwd=tmp_path)
    one_clear_error(result, "Training diverged", "became non-finite at step", "Lower the learning rate", "last.ckpt")
    assert last.read_bytes() == good  # nothing diverged was saved over it


def test_resuming_with_changed_model_settings_warns_which_ones_the_checkpoint_overrides(tmp_path):
    config = str(tiny_config(tmp_path))
    assert lightning("fit", "--config", config, cwd=tmp_path).returncode == 0
    last = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    args = ("fit", "--config", config, "--ckpt_path", str(last), "--trainer.max_epochs", "2")
    changed = lightning(*args, "--model.init_args.lr", "0.5", cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "model.init_args.lr: 0.5 -> 0.1" in changed.stderr
    same = lightning(*args, "--trainer.max_epochs", "3", cwd=tmp_path)
    assert same.returncode == 0 and "replace these of the command" not in same.stderr


def test_a_full_disk_and_an_empty_aux_set_are_user_errors():
    full = _user_error(RuntimeError("saving failed").with_traceback(None))
    assert full is None
    error = OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoints/last.ckpt")
    wrapped = RuntimeError("checkpoint save failed")
    wrapped.__cause__ = error
    message = str(_user_error(wrapped))
    assert "No space left on the device while writing runs/x/checkpoints/last.ckpt" in message
    assert "--ckpt_path" in message
    empty = DefenseDataModule(SyntheticDataModule(train_per_class=4, test_per_class=2), _Nothing())
    with pytest.raises(ConfigurationError, match="holds no images"):
        empty.setup()


class _Nothing(SeenData):
    def select(self, source, victim=None):
        images, labels = super().select(source, victim)
        return images[:0], labels[:0]


def test_config_errors_keep_the_reason_and_drop_the_type_noise():
    raw = (
        'Parser key "model":\n  Does not validate against any of the Union subtypes\n  Subtypes: [...]\n'
        "  Errors:\n    - Expected a dot import path string: Nope\n    - Expected a <class 'NoneType'>\n"
        "  Given value type: <class 'jsonargparse._util.NestedArg'>\n"
    )
    message = config_error_message(raw)
    assert message.startswith('Parser key "model":') and "'Nope' is not a class" in message
    assert "REFINE" in message and "Subtypes" not in message and "NoneType" not in message


class _FailsHalfway:
    def __reduce__(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_checkpoint_write_that_fails_halfway_leaves_the_previous_one_whole(tmp_path):
    from lightning_defense.training.trainer import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, path)
    before = path.read_bytes()
    with pytest.raises(OSError):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "payload": _FailsHalfway()}, path)
    assert path.read_bytes() == before and torch.load(path, weights_only=True)["epoch"] == 1
    assert list(path.parent.iterdir()) == [path]  # no partial file left behind


def test_runs_write_their_checkpoints_through_the_atomic_writer(tmp_path, monkeypatch):
    from lightning.pytorch.plugins.environments import LightningEnvironment

    from lightning_defense.cli import build_cli
    from lightning_defense.training.trainer import AtomicCheckpointIO

    monkeypatch.setattr(sys, "argv", ["lightning"])
    cli = build_cli(["--config", str(tiny_config(tmp_path))], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    # a config's own plugins keep it
    environment = "lightning.pytorch.plugins.environments.LightningEnvironment"
    given = build_cli(["--config", str(tiny_config(tmp_path)), "--trainer.plugins", environment], run=False)
    assert isinstance(given.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert isinstance(given.trainer._accelerator_connector.cluster_environment, LightningEnvironment)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--model.init_args.lr", "-0.1"], "model.init_args.lr: -0.1"),
        (["--optimizer", "torch.optim.Adam", "--optimizer.lr", "0"], "optimizer.init_args.lr: 0"),
    ],
    ids=["model-lr", "optimizer-lr"],
)
def test_a_learning_rate_that_is_not_positive_is_refused_before_training(arguments, named, tmp_path):
    result = lightning("fit", "--config", str(tiny_config(tmp_path)), *arguments, cwd=tmp_path)
    one_clear_error(result, "Learning rates must be positive", named)
    assert not (tmp_path / "runs" / "tiny" / "version_0" / "checkpoints").exists()  # nothing trained
