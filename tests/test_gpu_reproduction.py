"""The one-command GPU reproduction (issue 33, part 3), rehearsed on the CPU with fixture data: every
stage runs, the summary and images/s land in the output folder, and a second call resumes instead of
starting over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import write_image_folder

REPO = Path(__file__).resolve().parents[1]
CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def reproduce(tmp_path: Path, data: Path) -> subprocess.CompletedProcess:
    env = os.environ | {
        "LIGHTNING_DEFENSE_DATA": str(data),
        "SMOKE": "1",
        "VICTIM_EPOCHS": "1",
        "VICTIM_KEEP_S": "120",
        "DEADLINE_S": "1500",
        "WORKERS": "0",
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu" / "reproduce.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )


def test_the_reproduction_runs_every_stage_and_a_second_call_resumes(tmp_path):
    data = tmp_path / "data"
    write_image_folder(data / "cifar10-jpeg" / "train", CIFAR, 20)
    write_image_folder(data / "cifar10-jpeg" / "test", CIFAR, 2)
    done = reproduce(tmp_path, data)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    rows = {row["name"]: row for row in summary["rows"]}
    assert set(rows) == {"victim", "refine_full", "btidbf_u_full"}
    assert all("val/ba" in row["last"] and "val/ra" in row["last"] for row in rows.values())
    throughput = json.loads((tmp_path / "out" / "throughput.json").read_text())["rows"]
    assert set(throughput) == set(rows) and all(r["images_per_s"] > 0 for r in throughput.values())
    # the defenses defended this run's victim, not another file
    victim = str(next((tmp_path / "work" / "runs" / "victim").glob("version_*/victim.safetensors")))
    assert all(victim in rows[name]["command"] for name in ("refine_full", "btidbf_u_full"))

    again = reproduce(tmp_path, data)  # every row finished: nothing runs again
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert len(list((tmp_path / "work" / "runs" / "victim").glob("version_*"))) == 1
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rows"] == summary["rows"]
