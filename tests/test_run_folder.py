"""Bad inputs and lost files (issue 26, parts 4 and 5), each through the console script: the exit
code, the message, and the files left on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_image_folder
from test_fault_tolerance import lightning, one_clear_error, tiny_config
from test_resume import refine, write_config

from lightning_defense.attacks import BadNets
from lightning_defense.cli import main
from lightning_defense.victims import Classifier
from lightning_defense.victims.victim_file import VictimMetadata, save_victim

pytestmark = pytest.mark.trust_boundary

QUICK = ("--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ran(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_file_in_a_data_folder_that_is_no_image_is_named(tmp_path):
    for split in ("train", "test"):
        write_image_folder(tmp_path / "data" / split, ["a", "b"], 4, suffix=".png")
    broken = tmp_path / "data" / "train" / "b" / "notes.png"
    broken.write_text("not an image")
    data = {"class_path": "ImageFolderDataModule", "init_args": {"root": str(tmp_path / "data"), "batch_size": 4}}
    config = tiny_config(tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings["data"] = data
    settings["model"]["init_args"]["num_classes"] = 2
    config.write_text(yaml.safe_dump(settings))
    result = lightning("fit", "--config", str(config), cwd=tmp_path)
    one_clear_error(result, str(broken), "is not a readable image", "Remove it")
    broken.unlink()
    ran(lightning("fit", "--config", str(config), *QUICK, cwd=tmp_path))  # the same folder, intact, trains


@pytest.mark.parametrize(
    ("option", "value"),
    [("input_bound", "-0.3"), ("feature_bound", "-1"), ("pretrain_input_bound", "-0.1"), ("vote_noise", "-0.03")],
)
def test_negative_btidbf_bounds_are_refused_at_start_up(option, value, tmp_path):
    parts = refine(tmp_path)
    parts["model"] = {"class_path": "BTIDBFUnlearning", "init_args": {"victim": parts["model"]["init_args"]["victim"]}}
    config = str(write_config(tmp_path, "btidbf", parts))
    result = lightning("fit", "--config", config, f"--model.init_args.{option}", value, cwd=tmp_path)
    one_clear_error(result, f"{option} = {value}", "must be >= 0")
    assert not (tmp_path / "btidbf").exists()  # refused before the run folder was made


def test_a_read_only_output_folder_is_named_before_training(tmp_path, monkeypatch, capsys):
    """Tested with the write failing as a read-only disk fails (the tests may run as root, whom a
    folder's permissions do not stop); the real check creates a file where the run will write."""
    import tempfile

    real = tempfile.TemporaryFile
    refused = tmp_path / "runs"

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).is_relative_to(tmp_path):
            raise OSError(30, "Read-only file system", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(tiny_config(tmp_path)), "--trainer.enable_progress_bar", "false"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "cannot write into" in error and str(refused) in error and "Read-only file system" in error
    assert not refused.exists()


def test_without_checkpointing_a_run_trains_and_writes_no_checkpoint(tmp_path):
    config = str(tiny_config(tmp_path))
    result = lightning("fit", "--config", config, "--trainer.enable_checkpointing", "false", cwd=tmp_path)
    ran(result)
    assert "an interrupted run cannot be resumed" in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))
    assert (tmp_path / "runs" / "tiny" / "version_0" / "metrics.csv").is_file()
    # a ModelCheckpoint of the config's own beside `enable_checkpointing: false` is a contradiction
    callback = '[{"class_path": "ModelCheckpoint", "init_args": {"save_last": true}}]'
    result = lightning(
        "fit",
        "--config",
        config,
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.callbacks",
        callback,
        cwd=tmp_path,
    )
    one_clear_error(result, "enable_checkpointing is false", "ModelCheckpoint")


def test_a_config_with_its_own_callbacks_still_writes_last_ckpt(tmp_path):
    """A config's `callbacks` list replaces the trainer's default list: last.ckpt must not go with it."""
    config = str(tiny_config(tmp_path))
    ran(lightning("fit", "--config", config, "--trainer.callbacks", '[{"class_path": "EpochSummary"}]', cwd=tmp_path))
    assert (tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_without_a_logger_a_run_gets_its_own_folder_and_the_working_directory_is_untouched(tmp_path):
    mine = tmp_path / "config.yaml"
    mine.write_text("my own file\n")
    config = str(tiny_config(tmp_path))
    for _ in range(2):
        ran(lightning("fit", "--config", config, "--trainer.logger", "false", cwd=tmp_path))
    assert mine.read_text() == "my own file\n"
    assert not (tmp_path / "checkpoints").exists()
    for version in (0, 1):
        folder = tmp_path / "runs" / "no_logger" / f"version_{version}"
        assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
    # and --ckpt_path last finds the newest of them
    result = lightning(
        "fit", "--config", config, "--trainer.logger", "false", "--trainer.max_epochs", "2", "--ckpt_path", "last",
        cwd=tmp_path,
    )  # fmt: skip
    ran(result)
    assert "runs/no_logger/version_1/checkpoints/last.ckpt" in result.stderr + result.stdout


def test_ckpt_path_last_resumes_the_newest_run_of_the_name_across_version_folders(tmp_path):
    config = str(tiny_config(tmp_path))
    runs = tmp_path / "runs" / "tiny"
    missing = lightning("fit", "--config", config, "--ckpt_path", "last", cwd=tmp_path)
    one_clear_error(
        missing, "--ckpt_path last: no last*.ckpt in", str(runs / "*" / "checkpoints"), "leave out --ckpt_path"
    )
    assert not list(runs.rglob("*.ckpt"))
    ran(lightning("fit", "--config", config, cwd=tmp_path))  # version_0, epoch 0
    first = torch.load(runs / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    result = lightning("fit", "--config", config, "--trainer.max_epochs", "2", "--ckpt_path", "last", cwd=tmp_path)
    ran(result)
    assert str(runs / "version_0" / "checkpoints" / "last.ckpt") in result.stderr + result.stdout
    resumed = torch.load(runs / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    # it went on from version_0's epoch: one more epoch of steps, not a fresh start
    assert resumed["epoch"] == first["epoch"] + 1 and resumed["global_step"] == 2 * first["global_step"]


def test_a_fixed_version_run_twice_keeps_the_first_run(tmp_path):
    config = str(tiny_config(tmp_path))
    fixed = ("--trainer.logger.init_args.version", "fixed")
    folder = tmp_path / "runs" / "tiny" / "fixed"
    ran(lightning("fit", "--config", config, *fixed, cwd=tmp_path))
    kept = {path.name: digest(path) for path in (folder / "config.yaml", folder / "checkpoints" / "last.ckpt")}
    again = lightning("fit", "--config", config, *fixed, cwd=tmp_path)
    one_clear_error(again, "already holds checkpoints of another run", "--ckpt_path", "leave trainer.logger")
    assert {p.name: digest(p) for p in (folder / "config.yaml", folder / "checkpoints" / "last.ckpt")} == kept
    first_run = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert "last.ckpt" in first_run and not [name for name in first_run if "-v" in name]
    # resuming in its own folder goes on: the same last.ckpt, and the first config.yaml stays beside the new one
    last = folder / "checkpoints" / "last.ckpt"
    ran(
        lightning(
            "fit", "--config", config, *fixed, "--trainer.max_epochs", "2", "--ckpt_path", str(last), cwd=tmp_path
        )
    )
    assert not [p.name for p in (folder / "checkpoints").iterdir() if "-v" in p.name]  # no last-v1.ckpt
    assert torch.load(last, weights_only=True)["epoch"] == 1
    assert digest(folder / "config.yaml") == kept["config.yaml"] and (folder / "config-v1.yaml").is_file()


@pytest.mark.parametrize(
    "recorded",
    [
        {"class_path": "lightning_defense.data.datamodules.CIFAR10DataModule"},  # files before image_size was kept
        {"class_path": "lightning_defense.data.synthetic.SyntheticDataModule", "image_size": [32, 32]},
    ],
    ids=["class-default", "recorded"],
)
def test_a_victim_fed_images_of_another_size_is_refused(recorded, tmp_path):
    parts = refine(tmp_path)
    victim = Path(parts["model"]["init_args"]["victim"])
    save_victim(
        victim, Classifier("resnet20", 10), VictimMetadata("resnet20", 10, attack=BadNets().config(), data=recorded)
    )
    source = parts["data"]["init_args"]["source"]
    source["init_args"] = {**source["init_args"], "image_size": [64, 64]}
    config = str(write_config(tmp_path, "defense", parts))
    result = lightning("fit", "--config", config, *QUICK, cwd=tmp_path)
    one_clear_error(result, "was trained on 32x32 images", "serves 64x64")
    assert not list(tmp_path.rglob("*.ckpt"))


def test_two_runs_started_together_never_share_a_folder(tmp_path):
    """Started at once they would compute the same next version (or share a fixed one)."""
    import subprocess
    import sys

    config = str(tiny_config(tmp_path))

    def start(*extra):
        command = [sys.executable, "-m", "lightning_defense", "fit", "--config", config, *extra]
        env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "LIGHTNING_DEFENSE_TRACEBACK": ""}
        return subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)

    runs = [start(), start()]
    assert [run.wait(timeout=300) for run in runs] == [0, 0], [run.stderr.read()[-2000:] for run in runs]
    folders = sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir() if p.is_dir())
    assert folders == ["version_0", "version_1"]
    for folder in folders:  # each run's own files, whole
        assert sorted(p.name for p in (tmp_path / "runs" / "tiny" / folder / "checkpoints").glob("last*")) == [
            "last.ckpt"
        ]
    fixed = [start("--trainer.logger.init_args.version", "same"), start("--trainer.logger.init_args.version", "same")]
    codes = sorted(run.wait(timeout=300) for run in fixed)
    errors = "".join(run.stderr.read() for run in fixed)
    # refused while the other runs, or (when it was quicker) because its checkpoints are there now
    refused = "Another run is writing into" in errors or "already holds checkpoints of another run" in errors
    assert codes == [0, 2] and refused and "Traceback" not in errors


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--data.init_args.batch_size", "0"], "batch_size must be a positive integer"),
        (["--data.init_args.num_workers", "-1"], "num_workers must be 0"),
        (["--data.init_args.train_per_class", "0"], "train_per_class must be at least 1"),
        (["--data.init_args.image_size", "[-4, 32]"], "image_size must be two positive integers"),
        (["--data.init_args.reserved_fraction", "1"], "reserved_fraction must be in [0, 1)"),
        (["--trainer.devices", "0"], "trainer options"),
        (["--trainer.accelerator", "gpu"], "trainer options"),
        (["--model.init_args.export_name", "/tmp/notes.txt"], "export_name must be a file name"),
        (["--data.init_args.attack.init_args.patch_size", "16000"], "patch_size must be in [1, 1024]"),
    ],
    ids=["batch0", "workers", "per-class", "size", "reserved", "devices", "gpu", "export-name", "patch"],
)
def test_settings_that_cannot_work_are_one_message(arguments, expected, tmp_path):
    if "gpu" in arguments and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = lightning("fit", "--config", str(tiny_config(tmp_path)), *arguments, cwd=tmp_path)
    one_clear_error(result, expected)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_defense_whose_model_and_data_name_different_victims_is_refused(tmp_path):
    parts = refine(tmp_path)
    other = tmp_path / "other.safetensors"
    other.write_bytes(Path(parts["model"]["init_args"]["victim"]).read_bytes())
    config = str(write_config(tmp_path, "defense", parts))
    result = lightning("fit", "--config", config, *QUICK, "--data.init_args.victim", str(other), cwd=tmp_path)
    one_clear_error(result, "model.init_args.victim is", "but data.init_args.victim is", str(other))


def test_a_checkpoint_with_nan_weights_or_no_state_dict_is_refused(tmp_path):
    config = str(tiny_config(tmp_path))
    ran(lightning("fit", "--config", config, cwd=tmp_path))
    last = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    name = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"][name] = torch.full_like(checkpoint["state_dict"][name], float("nan"))
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    del checkpoint["state_dict"]
    torch.save(checkpoint, tmp_path / "empty.ckpt")
    one_clear_error(
        lightning("validate", "--config", config, "--ckpt_path", str(tmp_path / "nan.ckpt"), cwd=tmp_path),
        "holds non-finite weights",
        name,
    )
    one_clear_error(
        lightning("validate", "--config", config, "--ckpt_path", str(tmp_path / "empty.ckpt"), cwd=tmp_path),
        "has no state_dict",
    )
    victim = tmp_path / "runs" / "tiny" / "version_0" / "victim.safetensors"
    one_clear_error(
        lightning("validate", "--config", config, "--ckpt_path", str(victim), cwd=tmp_path),
        "is a safetensors file",
        "model.init_args.victim",
    )
    untrained = lightning("validate", "--config", config, cwd=tmp_path)
    ran(untrained)
    assert "without --ckpt_path evaluates VictimTask as built" in untrained.stderr


def test_a_victim_file_with_nan_weights_is_refused(tmp_path):
    from lightning_defense.errors import UntrustedCheckpointError
    from lightning_defense.victims import load_victim

    classifier = Classifier("resnet20", 10)
    path = save_victim(tmp_path / "v.safetensors", classifier, VictimMetadata("resnet20", 10))
    assert load_victim(path).frozen  # the intact file loads
    with torch.no_grad():
        next(classifier.parameters()).fill_(float("nan"))
    save_victim(path, classifier, VictimMetadata("resnet20", 10))
    with pytest.raises(UntrustedCheckpointError, match="non-finite weights"):
        load_victim(path)


def test_image_folders_skip_hidden_folders_refuse_empty_classes_and_read_16_bit_pngs(tmp_path):
    import numpy as np
    from PIL import Image

    from lightning_defense.data.datasets import load_image_folder
    from lightning_defense.errors import InputNotFoundError

    write_image_folder(tmp_path / "train", ["a", "b"], 2, suffix=".png")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype("uint16")).save(tmp_path / "train" / "b" / "x.png")
    images, labels, classes = load_image_folder(tmp_path / "train", size=(32, 32))
    assert classes == ["a", "b"] and images.dtype == torch.uint8 and len(images) == 5
    (tmp_path / "train" / "c").mkdir()
    with pytest.raises(InputNotFoundError, match="holds no images"):
        load_image_folder(tmp_path / "train", size=(32, 32))


def test_a_claimed_run_folder_moves_an_automatic_version_on_and_refuses_a_fixed_one(tmp_path):
    """The lock itself, deterministically: the first claim holds version_0 until released."""
    from types import SimpleNamespace

    from lightning.pytorch.loggers import CSVLogger

    from lightning_defense.errors import ConfigurationError
    from lightning_defense.io.run_folder import claim_run_folder, release_run_folders

    class Trainer(SimpleNamespace):
        log_dir = property(lambda self: self.logger.log_dir)

    def trainer(version=None):
        return Trainer(logger=CSVLogger(tmp_path, name="runs", version=version), default_root_dir=None)

    try:
        first, second = trainer(), trainer()
        assert first.log_dir == second.log_dir  # both computed version_0 before either made it
        assert claim_run_folder(first, automatic_version=True).name == "version_0"
        assert claim_run_folder(second, automatic_version=True).name == "version_1"  # version_0 is held
        with pytest.raises(ConfigurationError, match="Another run is writing into"):
            claim_run_folder(trainer(version=0), automatic_version=False)
    finally:
        release_run_folders()
    assert claim_run_folder(trainer(version=0), automatic_version=False).name == "version_0"  # free again
    release_run_folders()
