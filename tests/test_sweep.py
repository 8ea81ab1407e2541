"""benchmarks/sweep.py: rows repeated over seeds, and their mean ± std."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from sweep import row_commands, seed_rows  # noqa: E402


def test_every_row_runs_once_per_seed_with_that_seed(tmp_path):
    spec = {"base": ["a.yaml"], "variants": {"plain": [], "lr": ["--model.init_args.lr", "0.1"], "skip": []}}
    commands = row_commands(spec, ["--trainer.max_epochs", "1"], tmp_path, only=["plain", "lr"], seeds=[0, 3])
    assert list(commands) == ["plain_seed0", "plain_seed3", "lr_seed0", "lr_seed3"]
    lr3 = commands["lr_seed3"]
    assert lr3[lr3.index("--seed_everything") + 1] == "3" and "0.1" in lr3 and "1" in lr3
    assert lr3[lr3.index("--trainer.logger.init_args.name") + 1] == "lr_seed3"  # a folder per run
    assert "--seed_everything" not in row_commands(spec, [], tmp_path)["plain"]  # no seeds: as before


def test_seed_rows_report_mean_and_sample_std():
    def run(name, ba, asr_any):
        return {"name": name, "last": {"val/ba": ba, "val/asr_any": asr_any}}

    results = [run("refine_seed0", 0.70, 0.10), run("refine_seed1", 0.72, 0.20), run("refine_seed2", 0.74, 0.30)]
    table = seed_rows([*results, run("single", 0.5, 0.5)])
    line = next(line for line in table.splitlines() if line.startswith("| refine (0, 1, 2)"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert cells[header.index("ba %")] == "72.00 ± 2.00"
    assert cells[header.index("asr_any %")] == "20.00 ± 10.00"
    assert cells[header.index("ra %")] == "–"
    assert "single" not in table
    assert float(cells[header.index("ba %")].split(" ± ")[1]) == pytest.approx(2.0)
