"""Shipped configs and victims, addressable by name from any folder (lightning_defense.io.shipped)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lightning_defense import shipped
from lightning_defense.attacks import BadNets
from lightning_defense.cli import main, with_shipped_configs
from lightning_defense.io.safetensors_files import sha256
from lightning_defense.victims import Classifier, VictimMetadata, load_victim, read_victim_metadata, save_victim

REPO = Path(__file__).resolve().parents[1]
BADNETS = "checkpoints/cifar10_resnet20_badnets.safetensors"


def test_a_config_name_finds_the_shipped_config_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refine = (REPO / "configs" / "refine.yaml").resolve()
    for name in ("refine", "refine.yaml", "configs/refine.yaml"):
        assert Path(shipped.config_path(name)).resolve() == refine
    assert (
        Path(shipped.config_path("victims/cifar10_badnets")).resolve()
        == (REPO / "configs" / "victims" / "cifar10_badnets.yaml").resolve()
    )
    assert shipped.config_path("no_such_config") == "no_such_config"  # the CLI then names it missing
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "refine.yaml").write_text("model: {}\n")
    assert shipped.config_path("configs/refine.yaml") == "configs/refine.yaml"  # a file here always wins
    argv = with_shipped_configs(["fit", "--config", "btidbf_u", "-c", "refine/no_supcon", "--config=tmr"])
    assert argv[2].endswith("configs/btidbf_u.yaml") and argv[4].endswith("configs/refine/no_supcon.yaml")
    assert argv[5].startswith("--config=") and argv[5].endswith("configs/tmr.yaml")
    assert "refine" in shipped.shipped_configs() and "victims/cifar10_badnets" in shipped.shipped_configs()


def test_a_shipped_victim_path_works_outside_a_clone_and_a_local_file_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not Path(BADNETS).exists()  # positive control: the relative path alone would not open
    assert shipped.resolve(BADNETS).resolve() == (REPO / BADNETS).resolve()
    assert load_victim(BADNETS).metadata.attack["class_path"].endswith("BadNets")
    assert shipped.resolve("elsewhere/x.safetensors") == Path("elsewhere/x.safetensors")  # only checkpoints/
    local = save_victim(tmp_path / BADNETS, Classifier("resnet20", 10), VictimMetadata("resnet20", 10))
    assert shipped.resolve(BADNETS) == Path(BADNETS)
    assert read_victim_metadata(BADNETS).attack is None  # the clean local file, not the shipped BadNets one
    assert local.is_file()


def test_the_embedded_default_runs_by_name_in_an_empty_folder_and_writes_only_its_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning"])
    quick = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
    main(["fit", "--config", "refine", *quick])
    assert (tmp_path / "runs" / "refine" / "version_0" / "defended.safetensors").is_file()
    main(["fit", "--config", "refine", "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false"])
    # fast_dev_run drops the logger: its files go to a run folder too, never the working folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert (tmp_path / "runs" / "no_logger" / "version_0" / "defended.safetensors").is_file()


def test_shipped_lists_every_victim_with_its_sha256_and_only_metrics_measured_on_that_file(
    tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "checkpoints"
    metadata = VictimMetadata("resnet20", 10, attack=BadNets(target=3).config())
    kept = save_victim(folder / "kept.safetensors", Classifier("resnet20", 10), metadata)
    changed = save_victim(folder / "changed.safetensors", Classifier("resnet20", 10), VictimMetadata("resnet20", 10))
    metrics = {"ba": 0.8, "asr": 0.99, "ra": 0.01, "asr_any": 0.99}
    measured = {
        "kept.safetensors": {"sha256": sha256(kept), "metrics": metrics},
        "changed.safetensors": {"sha256": "0" * 64, "metrics": metrics},  # measured on another file
    }
    (folder / shipped.MEASURED).write_text(json.dumps({"victims": measured}))
    monkeypatch.setattr(shipped, "_folder", lambda name: folder if name == "checkpoints" else None)
    rows = {Path(r["file"]).name: r for r in shipped.shipped_victims()}
    assert rows["kept.safetensors"]["metrics"] == metrics and rows["kept.safetensors"]["target"] == 3
    assert rows["changed.safetensors"]["metrics"] is None and rows["changed.safetensors"]["attack"] == "none (clean)"
    assert rows["changed.safetensors"]["sha256"] == sha256(changed)
    main(["shipped"])
    out = capsys.readouterr().out
    assert f"{sha256(kept)}  checkpoints/kept.safetensors" in out.splitlines()
    assert "80.00" in out and "BadNets" in out


@pytest.mark.parametrize("name", ["refine", "victims/cifar10_badnets"])
def test_every_shipped_config_name_resolves_to_a_file_of_the_repository(name):
    assert Path(shipped.config_path(name)).is_file()
