"""benchmarks/sweep.py: rows repeated over seeds, and their mean ± std."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from sweep import ran, row_commands, seed_rows  # noqa: E402


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


def test_rows_kept_from_an_earlier_sweep_join_the_table_with_their_machine_and_are_not_rerun(tmp_path, monkeypatch):
    import json

    import sweep

    def row(name, ba):
        return {"name": name, "command": f"lightning fit {name}", "epochs": 1, "wall_s": 60.0,
                "last": {"val/ba": ba}, "curves": {"val/ba": [ba]}, "validated_after_epoch": [1]}  # fmt: skip

    earlier = tmp_path / "earlier.json"
    rows = [row("plain_seed0", 0.7), row("plain_seed1", 0.72), row("gone_seed0", 0.1)]
    earlier.write_text(json.dumps({"machine": {"cpu": "earlier box"}, "rows": rows}))
    variants = tmp_path / "variants.yaml"
    variants.write_text("base: [a.yaml]\nvariants:\n  plain: []\n  other: []\n")
    ran = []
    monkeypatch.setattr(sweep, "run_logged", lambda name, *a, **k: ran.append(name))
    monkeypatch.setattr(sweep, "summarize", lambda name, cmd, out: {**row(name, 0.74), "command": cmd})
    argv = ["sweep.py", str(variants), "--out", str(tmp_path / "out"), "--seeds", "0", "1", "2", "--keep", str(earlier)]
    monkeypatch.setattr(sys, "argv", [*argv, "--only", "plain"])
    sweep.main()
    assert ran == ["plain_seed2"]  # the kept seeds are not run again
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["name"] for r in summary["rows"]] == ["plain_seed0", "plain_seed1", "plain_seed2"]
    assert summary["rows"][0]["machine"] == {"cpu": "earlier box"}  # each kept row keeps its own machine
    assert summary["rows"][2]["machine"] == summary["machine"] != {"cpu": "earlier box"}
    assert "72.00 ± 2.00" in (tmp_path / "out" / "summary.md").read_text()  # mean over kept and new seeds


def test_a_summary_records_the_command_a_row_ran_with_not_the_one_planned_now(tmp_path):
    planned = ["lightning", "fit", "--config", "a.yaml"]
    assert ran("row", planned, tmp_path) == "lightning fit --config a.yaml"  # never started: the plan
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "row.argv.json").write_text('["fit", "--config", "a.yaml", "--model.init_args.victim", "v"]')
    assert ran("row", planned, tmp_path) == "lightning fit --config a.yaml --model.init_args.victim v"
