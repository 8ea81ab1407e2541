"""The trust boundary: a checkpoint is data. Each crafted file is refused without running its
payload, and each test has a positive control showing the payload fires when not guarded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import RunsCode
from lightning.pytorch.cli import LightningCLI
from test_fault_tolerance import lightning, one_clear_error, tiny_config
from test_resume import refine, write_config

from lightning_defense.cli import DefenseCLI, main
from lightning_defense.errors import UntrustedCheckpointError
from lightning_defense.io.torch_files import load_weights
from lightning_defense.training.trainer import AtomicCheckpointIO

#: run again on the lowest versions pyproject.toml allows (`nox -s lowest`, .ci/run)
pytestmark = pytest.mark.trust_boundary


@pytest.fixture
def trained(tmp_path):
    """A tiny victim run's config and its last.ckpt."""
    config = str(tiny_config(tmp_path))
    assert lightning("fit", "--config", config, cwd=tmp_path).returncode == 0
    return config, tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("version", ["2.4.1", "2.9.1+cpu", "1.13.0"])
def test_an_old_torch_reads_no_torch_file(version, tmp_path, monkeypatch):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, path)
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(UntrustedCheckpointError, match=r"pip install 'torch>=2\.10'"):
        load_weights(path)
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    assert torch.equal(load_weights(path)["w"], torch.zeros(1))


def test_a_pickle_behind_a_file_url_is_refused(trained, tmp_path):
    config, _ = trained
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, evil)
    result = lightning("validate", "--config", config, "--ckpt_path", f"file://{evil}", cwd=tmp_path)
    one_clear_error(result, "pickled Python objects")
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # positive control: unguarded, the payload runs
    assert marker.exists()


def test_the_atomic_writer_reads_weights_only_whatever_lightning_asks(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"payload": RunsCode(marker)}, evil)
    with pytest.raises(UntrustedCheckpointError, match="pickled Python objects"):
        AtomicCheckpointIO().load_checkpoint(evil, weights_only=False)
    assert not marker.exists()


def _checkpoint_naming(tmp_path: Path, last: Path, class_path: str) -> Path:
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = class_path
    path = tmp_path / "swapped.ckpt"
    torch.save(checkpoint, path)
    return path


def test_a_class_path_in_a_checkpoint_is_never_imported(trained, tmp_path, monkeypatch, capsys):
    config, last = trained
    marker = tmp_path / "code-ran"
    (tmp_path / "payload_on_import.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\nclass Model:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["lightning"])
    evil = _checkpoint_naming(tmp_path, last, "payload_on_import.Model")
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", config, "--ckpt_path", str(evil)])
    assert exit_info.value.code == 2 and not marker.exists()
    assert "was written by 'payload_on_import.Model'" in capsys.readouterr().err
    # positive control: LightningCLI's own reading of the same checkpoint imports the module
    monkeypatch.setattr(DefenseCLI, "_parse_ckpt_path", LightningCLI._parse_ckpt_path)
    monkeypatch.delitem(sys.modules, "payload_on_import", raising=False)
    with pytest.raises(BaseException):  # noqa: B017  (what fails after the import does not matter)
        main(["validate", "--config", config, "--ckpt_path", str(evil)])
    assert marker.exists()
    monkeypatch.delitem(sys.modules, "payload_on_import", raising=False)


def test_a_checkpoint_of_another_class_is_refused(trained, tmp_path):
    config, last = trained
    other = _checkpoint_naming(tmp_path, last, "lightning_defense.defenses.refine.lightning_model.REFINE")
    result = lightning("validate", "--config", config, "--ckpt_path", str(other), cwd=tmp_path)
    one_clear_error(result, "was written by 'lightning_defense.defenses.refine.lightning_model.REFINE'")
    # the short name the CLI records and the full module path name the same class: accepted
    same = _checkpoint_naming(tmp_path, last, "lightning_defense.training.victim_task.VictimTask")
    assert lightning("validate", "--config", config, "--ckpt_path", str(same), cwd=tmp_path).returncode == 0


def test_a_checkpoint_of_another_victim_is_refused(tmp_path):
    parts = refine(tmp_path)
    config = str(write_config(tmp_path, "defense", parts))
    quick = ("--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1")
    assert lightning("fit", "--config", config, *quick, cwd=tmp_path).returncode == 0
    last = next((tmp_path / "defense").glob("run/version_0/checkpoints/last.ckpt"))
    other = tmp_path / "other.safetensors"
    other.write_bytes(Path(parts["model"]["init_args"]["victim"]).read_bytes())
    swap = ("--model.init_args.victim", str(other), "--data.init_args.victim", str(other))
    result = lightning("validate", "--config", config, *quick, *swap, "--ckpt_path", str(last), cwd=tmp_path)
    one_clear_error(result, "defends victim", str(other), "Resume with the run's own victim")
    assert lightning("validate", "--config", config, *quick, "--ckpt_path", str(last), cwd=tmp_path).returncode == 0


def test_every_resume_path_checks_the_victim(tmp_path):
    """`--ckpt_path last` (or best, hpc) bypasses the CLI's reading: the module refuses it too."""
    parts = refine(tmp_path)
    from lightning_defense.defenses import REFINE

    model = REFINE(**parts["model"]["init_args"])
    model.on_load_checkpoint({"hyper_parameters": {"victim": parts["model"]["init_args"]["victim"]}})
    with pytest.raises(UntrustedCheckpointError, match="defends victim"):
        model.on_load_checkpoint({"hyper_parameters": {"victim": str(tmp_path / "another.safetensors")}})


@pytest.mark.parametrize(
    "checkpoint",
    [
        [1, 2],
        {"hyper_parameters": [1]},
        {"hyper_parameters": {"_class_path": 7}},
        {"state_dict": {}, "hyper_parameters": {"num_classes": "ten"}},  # a setting of the wrong type
        {"state_dict": {}, "hyper_parameters": {"lr": list(range(300_000))}},  # named in a short message
        {"state_dict": {"w": 1}},  # a state dict that is not of tensors
    ],
    ids=["list", "hparams-list", "class-path-int", "wrong-type", "huge", "not-tensors"],
)
def test_a_malformed_checkpoint_is_one_clear_error(checkpoint, trained, tmp_path):
    config, _ = trained
    path = tmp_path / "odd.ckpt"
    torch.save(checkpoint, path)
    result = lightning("validate", "--config", config, "--ckpt_path", str(path), cwd=tmp_path)
    one_clear_error(result, str(path))
    assert len(result.stderr) < 4000


def _altered_victim(tmp_path: Path, **changes: str) -> Path:
    """The victim file of test_victim_file with some metadata entries replaced (raw JSON strings)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from test_victim_file import make_victim

    _, path = make_victim(tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    metadata = {k: v for k, v in {**metadata, **changes}.items() if v is not None}
    altered = tmp_path / "altered.safetensors"
    save_file(tensors, str(altered), metadata=metadata)
    return altered


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_classes": str(2**40)}, r"num_classes must be in \[2, 100,000\], not 1,099,511,627,776"),
        ({"num_classes": "100001"}, r"num_classes must be in \[2, 100,000\]"),
        ({"num_classes": "{not json"}, "is not valid JSON"),
        ({"num_classes": None}, "lack 'num_classes'"),
        ({"backdoor": '"x"'}, "name 'backdoor', which VictimMetadata does not take"),
        ({"std": "[0.2, 0, 0.2]"}, "std must be positive"),
        ({"attack": '{"class_path": "os.system", "init_args": {}}'}, "Unknown attack 'os.system'"),
        ({"attack": '{"class_path": "BadNets", "init_args": {"target": 1, "payload": 1}}'}, "name 'payload'"),
    ],
    ids=["huge-class-count", "too-many-classes", "malformed-json", "missing-key", "unknown-key", "zero-std",
         "foreign-attack", "unknown-attack-argument"],
)  # fmt: skip
def test_victim_metadata_is_checked_against_its_schema(changes, message, tmp_path):
    from lightning_defense.attacks.base import attack_of_victim
    from lightning_defense.errors import UserInputError
    from lightning_defense.victims import load_victim, read_victim_metadata

    assert attack_of_victim(_altered_victim(tmp_path)).target == 1  # control: the unaltered file loads
    with pytest.raises(UserInputError, match=message):
        path = _altered_victim(tmp_path, **changes)
        read_victim_metadata(path)
        load_victim(path)
        attack_of_victim(path)


def test_mae_and_export_settings_are_checked(tmp_path):
    from lightning_defense.defenses.bdmae.mae import MaskedAutoencoder, load_mae, save_mae

    mae = MaskedAutoencoder(image_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=1, decoder_embed_dim=8,
                            decoder_depth=1, decoder_num_heads=1)  # fmt: skip
    path = save_mae(tmp_path / "mae.safetensors", mae)
    assert load_mae(path).config == mae.config  # control
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    for config, message in (({**mae.config, "embed_dim": 2**40}, "beyond any sensible"), ([1], "not a mapping")):
        save_file(tensors, str(path), metadata={**metadata, "config": json.dumps(config)})
        with pytest.raises(UntrustedCheckpointError, match=message):
            load_mae(path)
