"""Grids of ordinary runs: the auxiliary-data study and the benchmark sweeps share this runner.

``lightning-defense study --config configs/studies/aux_shift.yaml`` runs every cell of
defenses x auxiliary data x {without, with GIC} against one victim. Each cell is a normal
``lightning fit`` whose whole configuration is first written to ``<out>/cells/<cell>.yaml``, so a
cell can be rerun alone with ``lightning fit --config <out>/cells/<cell>.yaml``; its Lightning
folder is ``<out>/runs/<cell>/`` and its output ``<out>/logs/<cell>.log``. Finished cells
(``logs/<cell>.time``, written only when a run exits 0) are not run again, and a cell that was
interrupted resumes from its ``last.ckpt`` (``--ckpt_path last``), so an interrupted study
continues where it stopped, mid-cell included. At the end the study writes ``results.csv``, ``results.md``
(BA / ASR per cell) and ``results.png`` (grouped bars) to ``<out>``.
"""

from __future__ import annotations

import csv
import json
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_defense.errors import ConfigurationError
from lightning_defense.study.reporting import write_results
from lightning_defense.training.callbacks import EpochMetricsFile
from lightning_defense.training.hardware import worker_environment


def supersede(out: Path, name: str) -> None:
    """Set a run's earlier attempt aside (``runs/<name>`` to ``runs/<name>.superseded-<k>``, nothing
    deleted) so that nothing of it is resumed or tabulated: its settings changed."""
    folder = out / "runs" / name
    if folder.is_dir():
        k = 0
        while (aside := folder.with_name(f"{name}.superseded-{k}")).exists():
            k += 1
        folder.rename(aside)
    for suffix in (".time", ".elapsed"):
        (out / "logs" / f"{name}{suffix}").unlink(missing_ok=True)


#: options that bound how long a run may take, not what it computes: a resumed run may set another
BUDGET_OPTIONS = ("--trainer.max_time",)


def experiment(argv: list[str]) -> list[str]:
    """``argv`` without the options of :data:`BUDGET_OPTIONS` (and their values)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in BUDGET_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{option}=" for option in BUDGET_OPTIONS)):
            kept.append(arg)
    return kept


def run_logged(name: str, argv: list[str], out: Path, env: dict[str, str] | None = None, tag: str = "study") -> int:
    """Run ``lightning <argv>`` with its output in ``<out>/logs/<name>.log``; skipped when a
    previous run of ``name`` finished (``<out>/logs/<name>.time`` holds its wall seconds).

    A ``fit`` that was interrupted (a ``last*.ckpt`` under ``<out>/runs/<name>/``, no ``.time``)
    resumes from it with ``--ckpt_path last``, its output appended to the log, when its command is
    the one that started it (``logs/<name>.argv.json``; a time budget such as ``--trainer.max_time``
    may differ, so a second lease of a machine continues the first); another command starts afresh,
    the old attempt set aside (:func:`supersede`). The wall time is summed over the attempts:
    ``logs/<name>.elapsed`` is brought up to date while a run goes, so a killed attempt's time
    still counts.
    """
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    timing, elapsed, started = logs / f"{name}.time", logs / f"{name}.elapsed", logs / f"{name}.argv.json"
    if timing.is_file():
        print(f"[{tag}] {name}: done before, skipped", flush=True)
        return 0
    if started.is_file() and experiment(json.loads(started.read_text())) != experiment(argv):
        print(f"[{tag}] {name}: its command changed; the earlier attempt is set aside", flush=True)
        supersede(out, name)
    started.write_text(json.dumps(argv))
    before = float(elapsed.read_text() or 0) if elapsed.is_file() else 0.0
    resume = (
        argv[:1] == ["fit"]
        and "--ckpt_path" not in argv
        and any((out / "runs" / name).glob("*/checkpoints/last*.ckpt"))
    )
    if resume:
        argv = [*argv, "--ckpt_path", "last"]
    print(f"[{tag}] {name}: lightning {shlex.join(argv)}", flush=True)
    start = time.monotonic()
    stopped = threading.Event()

    def keep_elapsed() -> None:  # a session that ends abruptly leaves at most 15 s uncounted
        while not stopped.wait(15):
            elapsed.write_text(f"{before + time.monotonic() - start:.1f}")

    threading.Thread(target=keep_elapsed, daemon=True).start()
    # the same program as `lightning`, without relying on the console script being installed
    with (logs / f"{name}.log").open("a" if resume else "w") as log:
        if resume:
            log.write(f"\n[{tag}] interrupted after {before / 60:.1f} min; resumed from last.ckpt\n")
            log.flush()
        try:
            code = subprocess.run(
                [sys.executable, "-m", "lightning_defense", *argv], stdout=log, stderr=subprocess.STDOUT, env=env
            ).returncode
        finally:
            stopped.set()
    wall = time.monotonic() - start
    elapsed.write_text(f"{before + wall:.1f}")
    if code == 0 and "Received SIGTERM" in (logs / f"{name}.log").read_text(errors="replace"):
        code = 143  # Lightning ends a SIGTERMed run early and exits 0: not a finished run
    if code == 0:
        timing.write_text(f"{before + wall:.1f}")
        elapsed.unlink()
    print(f"[{tag}] {name}: exit {code} after {wall / 60:.1f} min", flush=True)
    return code


def read_metrics(folder: Path) -> list[dict[str, str]]:
    """The per-epoch metrics of every version folder under a Lightning run folder, oldest version
    first (a resumed run logs its later epochs in a new version folder): the run's own
    ``epochs.jsonl`` (:class:`~lightning_defense.training.callbacks.EpochMetricsFile`, whatever the logger),
    or for runs without one, the CSV logger's ``metrics.csv``."""
    versions = sorted(folder.glob("version_*"), key=lambda f: int(f.name.removeprefix("version_")))
    rows = []
    for version in versions:
        record, csv_file = version / EpochMetricsFile.FILENAME, version / "metrics.csv"
        if record.is_file():
            lines = record.read_text().splitlines()
            rows += [{key: str(value) for key, value in json.loads(line).items()} for line in lines if line]
        elif csv_file.is_file():
            with csv_file.open() as f:
                rows += list(csv.DictReader(f))
    return rows


def summarize(name: str, command: str, out: Path) -> dict[str, Any]:
    """Per run: its command, wall time, epochs, last validation metrics and their curves."""
    rows = read_metrics(out / "runs" / name)
    curves: dict[str, list[float]] = {}
    last: dict[str, float] = {}
    validated: list[int] = []  # the epoch of each validation (a config may validate every n epochs)
    trained = max((int(row["epoch"]) + 1 for row in rows if row.get("epoch")), default=0)
    # per epoch the last validation: a resumed run may validate an epoch its first attempt did
    validations = {int(row["epoch"]): row for row in rows if row.get("val/ba")}
    for epoch, row in sorted(validations.items()):
        validated.append(epoch + 1)
        for key, value in row.items():
            if key.startswith("val/") and value:
                curves.setdefault(key, []).append(float(value))
                last[key] = float(value)
    timing = out / "logs" / f"{name}.time"
    phases = sorted((out / "runs" / name).glob("version_*/phase_seconds.json"))  # phased defenses (BTI-DBF)
    return {
        "name": name,
        "command": command,
        "wall_s": float(timing.read_text()) if timing.is_file() else None,
        "epochs": trained,
        "validated_after_epoch": validated,
        "last": last,
        "curves": curves,
        "phase_seconds": json.loads(phases[-1].read_text()) if phases else None,
    }


@dataclass
class Cell:
    defense: str
    aux: str
    calibrated: bool

    @property
    def name(self) -> str:
        return f"{self.defense}__{self.aux}" + ("__gic" if self.calibrated else "")


@dataclass
class Study:
    """A grid of runs: every defense on every kind of auxiliary data, without and with GIC.

    Args:
        victim: the victim file every cell defends (set as both ``model.init_args.victim`` and
            ``data.init_args.victim``).
        defenses: name -> arguments of ``lightning fit`` that make that defense, e.g.
            ``[--config, configs/finetune.yaml]``; its data module must be a DefenseDataModule.
        aux_data: name -> the ``data.init_args.aux_data`` of that kind (``class_path``/``init_args``).
        calibration: ``init_args`` of :class:`~lightning_defense.data.Calibrated` for the
            "with GIC" cells; ``None`` runs only the cells without.
        unlabeled: defenses that must not see labels (REFINE): their data is wrapped in
            :class:`~lightning_defense.data.UnlabeledData`, so GIC calibrates toward the victim's
            pseudo-labels, not the ground truth they may never read.
        without_calibration: also run the cells without GIC.
        arguments: extra ``lightning fit`` arguments for every cell (e.g. fewer epochs).
        out: the study folder.
        jobs: cells run at the same time.
        threads: OMP_NUM_THREADS per cell (0: the caller's OMP_NUM_THREADS if set, else the cores
            divided between the ``jobs``).
    """

    victim: str
    defenses: dict[str, list[str]]
    aux_data: dict[str, dict[str, Any]]
    calibration: dict[str, Any] | None = field(default_factory=dict)
    unlabeled: list[str] = field(default_factory=list)
    without_calibration: bool = True
    arguments: list[str] = field(default_factory=list)
    out: str = "runs/study"
    jobs: int = 1
    threads: int = 0

    def cells(self) -> list[Cell]:
        calibrated = [False] * self.without_calibration + [True] * (self.calibration is not None)
        if not (self.defenses and self.aux_data and calibrated):
            raise ConfigurationError("A study needs at least one defense, one kind of aux_data and one GIC setting.")
        return [Cell(d, a, c) for d in self.defenses for a in self.aux_data for c in calibrated]

    def aux_config(self, cell: Cell) -> dict[str, Any]:
        aux = self.aux_data[cell.aux]
        if cell.defense in self.unlabeled:
            aux = {"class_path": "lightning_defense.data.UnlabeledData", "init_args": {"base": aux}}
        if not cell.calibrated:
            return aux
        return {
            "class_path": "lightning_defense.data.Calibrated",
            "init_args": {"base": aux, **(self.calibration or {})},
        }

    def fit_arguments(self, cell: Cell, out: Path) -> list[str]:
        return [
            *self.defenses[cell.defense],
            "--model.init_args.victim", self.victim,
            "--data.init_args.victim", self.victim,
            "--data.init_args.aux_data", json.dumps(self.aux_config(cell)),
            *self.arguments,
            "--trainer.logger.init_args.save_dir", str(out / "runs"),
            "--trainer.logger.init_args.name", cell.name,
        ]  # fmt: skip

    def write_cell_config(self, cell: Cell, out: Path, env: dict[str, str]) -> Path:
        """The cell's whole configuration as one file (``lightning fit --print_config``)."""
        path = out / "cells" / f"{cell.name}.yaml"
        arguments = out / "cells" / f"{cell.name}.args.json"
        wanted = json.dumps(self.fit_arguments(cell, out))
        if path.is_file() and (not arguments.is_file() or arguments.read_text() != wanted):
            # the study changed since this cell ran: its old config and result no longer apply
            path.unlink()
            supersede(out, cell.name)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            command = [
                sys.executable,
                "-m",
                "lightning_defense",
                "fit",
                *self.fit_arguments(cell, out),
                "--print_config",
            ]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise ConfigurationError(f"Cell {cell.name} has a bad configuration:\n{done.stderr.strip()[-2000:]}")
            config = yaml.safe_load(done.stdout)
            # the study's aux_data replaces the defense config's whole: jsonargparse merges the
            # init_args of successive configs, so a base config's `fraction` would sit beside the
            # study's `per_class` (which the data classes refuse) or change what the cell draws
            config["data"]["init_args"]["aux_data"] = self.aux_config(cell)
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            arguments.write_text(wanted)
        return path

    def run(self) -> list[dict[str, Any]]:
        out = Path(self.out)
        env = worker_environment(self.jobs, self.threads)
        cells = self.cells()
        configs = {cell.name: self.write_cell_config(cell, out, env) for cell in cells}  # bad cells fail first
        with ThreadPoolExecutor(self.jobs) as pool:
            codes = list(
                pool.map(lambda c: run_logged(c.name, ["fit", "--config", str(configs[c.name])], out, env), cells)
            )
        results = []
        for cell, code in zip(cells, codes, strict=True):
            summary = summarize(cell.name, f"lightning fit --config {configs[cell.name]}", out)
            results.append({**summary, "defense": cell.defense, "aux": cell.aux, "gic": cell.calibrated, "exit": code})
        write_results(results, out)
        failed = [r["name"] for r in results if r["exit"] != 0]
        if failed:
            print(f"[study] failed cells (see {out / 'logs'}): {', '.join(failed)}", flush=True)
        return results


def main(args: list[str] | None = None) -> None:
    """``lightning-defense study --config <study.yaml> [--out ...] [--jobs ...]``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lightning-defense study", description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(Study, fail_untyped=True)
    values = parser.parse_args(args).as_dict()
    values.pop("config", None)
    values.pop("__path__", None)
    results = Study(**values).run()
    if any(r["exit"] != 0 for r in results):
        raise SystemExit(1)
