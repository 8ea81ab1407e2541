"""The study runner: a tiny grid end to end through the console script."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from lightning_defense.attacks import BadNets
from lightning_defense.data.auxiliary import AuxiliaryData
from lightning_defense.study import Study
from lightning_defense.victims import Classifier, VictimMetadata, save_victim


def test_a_tiny_study_runs_every_cell_and_tabulates_them(tmp_path):
    victim = tmp_path / "victim.safetensors"
    save_victim(victim, Classifier("resnet20", 10), VictimMetadata("resnet20", 10, attack=BadNets(target=1).config()))
    source = {"train_per_class": 8, "test_per_class": 4, "reserved_fraction": 0.25}
    defense = {
        "seed_everything": 0,
        "model": {"class_path": "FineTune", "init_args": {"victim": "unset"}},
        "data": {
            "class_path": "DefenseDataModule",
            "init_args": {
                "source": {"class_path": "SyntheticDataModule", "init_args": source},
                "aux_data": {"class_path": "SeenData"},
                "batch_size": 8,
            },
        },
        "trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "enable_model_summary": False},
    }
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(defense))
    study = {
        "victim": str(victim),
        "defenses": {"ft": ["--config", str(tmp_path / "ft.yaml")]},
        "aux_data": {
            "seen": {"class_path": "SeenData", "init_args": {"per_class": 2}},
            "reserved": {"class_path": "ReservedData", "init_args": {"per_class": 2}},
        },
        "calibration": {"steps": 2, "cache_dir": str(tmp_path / "gic")},
        "out": str(tmp_path / "study"),
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lightning_defense", "study", "--config", str(tmp_path / "study.yaml")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    out = tmp_path / "study"
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["cell"] for r in rows] == ["ft__seen", "ft__seen__gic", "ft__reserved", "ft__reserved__gic"]
    assert all(r["ba"] and r["asr"] and r["victim_ba"] for r in rows)
    assert len(list((tmp_path / "gic").glob("gic_*.safetensors"))) == 2  # GIC ran once per kind of data
    table = (out / "results.md").read_text()
    assert "| aux data | ft | ft + GIC |" in table and "| reserved |" in table
    assert (out / "results.png").stat().st_size > 10_000
    # each cell is a normal run: its config reruns it alone
    cell = yaml.safe_load((out / "cells" / "ft__reserved__gic.yaml").read_text())
    assert cell["data"]["init_args"]["aux_data"]["class_path"].endswith("Calibrated")
    assert cell["model"]["init_args"]["victim"] == str(victim)
    # a second invocation skips the finished cells
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done before, skipped") == 4
    assert Path(out / "logs" / "ft__seen.log").read_text()


STUDIES = sorted((Path(__file__).resolve().parents[1] / "configs" / "studies").glob("*.yaml"))


@pytest.mark.parametrize("config", STUDIES, ids=lambda p: p.name)
def test_every_shipped_study_makes_valid_cell_configs(config, tmp_path, monkeypatch):
    monkeypatch.chdir(config.parents[2])
    study = Study(**yaml.safe_load(config.read_text()))
    cells = study.cells()
    settings = study.without_calibration + (study.calibration is not None)  # the controls run without GIC only
    assert len({c.name for c in cells}) == len(study.defenses) * len(study.aux_data) * settings
    for cell in (cells[0], cells[-1]):  # every cell would take minutes to print; ends cover both GIC settings
        printed = yaml.safe_load(study.write_cell_config(cell, tmp_path, dict(os.environ)).read_text())
        aux = printed["data"]["init_args"]["aux_data"]
        assert aux["class_path"].endswith("Calibrated") == cell.calibrated
        assert printed["model"]["init_args"]["victim"] == study.victim
        # the cell's data is the study's alone (a defense config's `fraction` once sat beside the
        # study's `per_class`, which the data classes refuse): it must build
        parser = ArgumentParser()
        parser.add_argument("--aux", type=AuxiliaryData)
        built = parser.instantiate(parser.parse_object({"aux": aux})).aux
        assert isinstance(built, AuxiliaryData)


def test_a_changed_study_reruns_its_cells_and_refine_never_calibrates_on_ground_truth(tmp_path, monkeypatch):
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    spec = yaml.safe_load((repo / "configs" / "studies" / "aux_shift.yaml").read_text())
    study = Study(**{**spec, "out": str(tmp_path)})
    refine_gic = next(c for c in study.cells() if c.defense == "refine" and c.calibrated)
    aux = study.aux_config(refine_gic)
    assert aux["class_path"].endswith("Calibrated") and aux["init_args"]["base"]["class_path"].endswith("UnlabeledData")
    ft_gic = next(c for c in study.cells() if c.defense == "ft" and c.calibrated)
    assert not study.aux_config(ft_gic)["init_args"]["base"]["class_path"].endswith("UnlabeledData")
    env = dict(os.environ)
    first = study.write_cell_config(ft_gic, tmp_path, env).read_text()
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / f"{ft_gic.name}.time").write_text("1.0")  # as if the cell had finished
    (tmp_path / "runs" / ft_gic.name / "version_0" / "checkpoints").mkdir(parents=True)
    assert study.write_cell_config(ft_gic, tmp_path, env).read_text() == first  # unchanged study: kept
    changed = Study(**{**spec, "out": str(tmp_path), "calibration": {**spec["calibration"], "steps": 7}})
    second = changed.write_cell_config(ft_gic, tmp_path, env).read_text()
    assert "steps: 7" in second and second != first
    assert not (tmp_path / "logs" / f"{ft_gic.name}.time").exists()  # its old result no longer counts
    assert not (tmp_path / "runs" / ft_gic.name).exists()  # nor is it resumed: set aside, not deleted
    assert (tmp_path / "runs" / f"{ft_gic.name}.superseded-0" / "version_0" / "checkpoints").is_dir()


def test_a_run_stopped_by_sigterm_is_not_marked_finished(tmp_path, monkeypatch):
    from lightning_defense.study import running as study_module

    def fake_run(command, stdout, **kwargs):  # Lightning's behaviour: stop early, say so, exit 0
        stdout.write("[rank: 0] Received SIGTERM: 15\n")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(study_module.subprocess, "run", fake_run)
    assert study_module.run_logged("cell", ["fit"], tmp_path) == 143
    assert not (tmp_path / "logs" / "cell.time").exists()


def test_an_interrupted_row_resumes_from_last_ckpt_and_its_time_and_metrics_add_up(tmp_path):
    """A row killed after its first epoch (a checkpoint, no .time) continues from last.ckpt at the
    next call: the second attempt trains only the second epoch, the wall time counts both
    attempts, and the summary holds both epochs' validations."""
    from lightning_defense.study import running as study_module

    source = {"class_path": "SyntheticDataModule", "init_args": {"train_per_class": 8, "test_per_class": 2}}
    source["init_args"] |= {"batch_size": 16, "attack": BadNets(target=1).config()}
    config = {
        "model": {"class_path": "VictimTask", "init_args": {"arch": "resnet20"}},
        "data": source,
        "trainer": {"enable_progress_bar": False, "enable_model_summary": False},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    logger = ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.name", "row"]
    argv = ["fit", "--config", str(tmp_path / "tiny.yaml"), *logger]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    assert study_module.run_logged("row", [*argv, "--trainer.max_epochs", "1"], tmp_path, env) == 0
    first = float((tmp_path / "logs" / "row.time").read_text())
    # as if a 2-epoch run had been killed right after its first epoch
    (tmp_path / "logs" / "row.time").rename(tmp_path / "logs" / "row.elapsed")
    two_epochs = [*argv, "--trainer.max_epochs", "2"]
    (tmp_path / "logs" / "row.argv.json").write_text(json.dumps(two_epochs))

    assert study_module.run_logged("row", two_epochs, tmp_path, env) == 0
    log = (tmp_path / "logs" / "row.log").read_text()
    assert "resumed from last.ckpt" in log and "--ckpt_path" not in " ".join(argv)
    resumed = list(csv.DictReader((tmp_path / "runs" / "row" / "version_1" / "metrics.csv").open()))
    assert {row["epoch"] for row in resumed} == {"1"}  # the second attempt trained epoch 2 only
    summary = study_module.summarize("row", "lightning fit ...", tmp_path)
    assert summary["validated_after_epoch"] == [1, 2] and summary["epochs"] == 2
    assert summary["wall_s"] > first and not (tmp_path / "logs" / "row.elapsed").exists()


def test_an_interrupted_row_resumes_only_under_the_command_that_started_it(tmp_path, monkeypatch):
    from lightning_defense.study import running as study_module

    commands = []

    def fake_run(command, stdout, **kwargs):  # the run is cut off again: no .time
        commands.append(command)
        return subprocess.CompletedProcess(command, 137)

    monkeypatch.setattr(study_module.subprocess, "run", fake_run)
    checkpoints = tmp_path / "runs" / "row" / "version_0" / "checkpoints"
    assert study_module.run_logged("row", ["fit", "--config", "a.yaml"], tmp_path) == 137
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_bytes(b"")  # the first attempt got as far as a checkpoint
    study_module.run_logged("row", ["fit", "--config", "a.yaml"], tmp_path)
    assert commands[-1][-2:] == ["--ckpt_path", "last"]  # same command: resumed
    study_module.run_logged("row", ["fit", "--config", "a.yaml", "--trainer.max_time", "00:00:05:00"], tmp_path)
    assert commands[-1][-2:] == ["--ckpt_path", "last"]  # another time budget is the same experiment
    study_module.run_logged("row", ["fit", "--config", "b.yaml"], tmp_path)
    assert "--ckpt_path" not in commands[-1]  # another command: a fresh start ...
    assert (
        tmp_path / "runs" / "row.superseded-0" / "version_0" / "checkpoints" / "last.ckpt"
    ).is_file()  # ... old kept
