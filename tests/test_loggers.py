"""Figures reach the logger a user chose, runs keep their own metrics record whatever the logger,
and plotting is an optional extra."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.loggers import Logger
from test_cli import tiny_config

from lightning_defense.cli import main
from lightning_defense.study import read_metrics, summarize
from lightning_defense.training.callbacks import TransformGrid, log_figure


class Recorder(Logger):
    """A logger whose experiment (or itself) records what it was given."""

    def __init__(self, experiment: object = None, with_log_image: bool = False) -> None:
        super().__init__()
        self._experiment = experiment if experiment is not None else SimpleNamespace()
        self.images: list = []
        if with_log_image:
            self.log_image = lambda key, images, step: self.images.append((key, images, step))

    name = "recorder"
    version = 0

    @property
    def experiment(self):
        return self._experiment

    def log_hyperparams(self, params, *args, **kwargs) -> None: ...

    def log_metrics(self, metrics, step=None) -> None: ...


def figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1])
    return fig


def test_figures_go_through_each_loggers_own_image_api():
    figures = []
    tensorboard = Recorder(SimpleNamespace(add_figure=lambda key, fig, global_step, close: figures.append((key, fig))))
    fig = figure()
    log_figure(tensorboard, "transforms", fig, 7)
    assert figures == [("transforms", fig)]
    wandb = Recorder(with_log_image=True)
    log_figure(wandb, "transforms", fig, 7)
    ((key, (image,), step),) = wandb.images
    assert key == "transforms" and step == 7 and image.ndim == 3 and image.shape[2] == 3  # RGB pixels
    log_figure(Recorder(), "transforms", fig, 7)  # no image API (CSV): nothing, and no error


def test_without_matplotlib_transform_grid_warns_once_and_draws_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    grid = TransformGrid()
    with pytest.warns(UserWarning, match=r"lightning-defense\[plots\]"):
        grid.setup(None, None, "fit")
    trainer = SimpleNamespace(sanity_checking=False)
    grid.on_validation_epoch_end(trainer, None)  # returns before touching the trainer or matplotlib


def test_every_run_keeps_its_metrics_whatever_the_logger_and_the_study_reads_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning"])
    config = str(tiny_config(tmp_path))
    main(["fit", "--config", config, "--trainer.logger", "false", "--trainer.max_epochs", "2"])
    run = tmp_path / "runs" / "no_logger"
    lines = [json.loads(line) for line in (run / "version_0" / "epochs.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1] and all("val/ba" in line for line in lines)
    assert not (run / "version_0" / "metrics.csv").exists()  # no CSV logger: the record is the run's own
    rows = read_metrics(run)
    assert [float(r["val/ba"]) for r in rows] == [line["val/ba"] for line in lines]
    out = tmp_path / "study"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "cell").symlink_to(run)
    summary = summarize("cell", "lightning fit ...", out)
    assert summary["epochs"] == 2 and summary["last"]["val/ba"] == lines[-1]["val/ba"]


def test_runs_written_before_the_record_are_read_from_their_csv(tmp_path):
    version = tmp_path / "run" / "version_0"
    version.mkdir(parents=True)
    (version / "metrics.csv").write_text("epoch,step,val/ba\n0,10,0.5\n")
    assert read_metrics(tmp_path / "run") == [{"epoch": "0", "step": "10", "val/ba": "0.5"}]
    assert Path(version / "metrics.csv").is_file()
