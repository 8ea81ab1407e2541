"""Tabulate victim runs from their logs (``lightning fit`` under ``/usr/bin/time -v``).

Each log names its run folder ("Victim written to <run>/victim.safetensors"); BA and ASR are
the last validation of that run (validation uses the full clean and poisoned test sets).

    python benchmarks/victim_table.py benchmarks/logs/cifar10_*.log
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

import yaml


def wall_time(log: str) -> str:
    match = re.search(r"Elapsed \(wall clock\) time.*: ([\d:.]+)", log)
    return match.group(1) if match else "?"


def row(log_path: Path) -> dict[str, str]:
    log = log_path.read_text(errors="replace")
    match = re.search(r"Victim written to (\S+)/victim\.safetensors", log)
    if match is None:
        raise SystemExit(f"{log_path}: no finished run in this log")
    run = Path(match.group(1))
    config = yaml.safe_load((run / "config.yaml").read_text())
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val/ba")]
    last = rows[-1]
    attack = config["data"]["init_args"]["attack"]
    return {
        "attack": attack["class_path"].rsplit(".", 1)[-1],
        "arch": config["model"]["init_args"]["arch"],
        "epochs": str(int(last["epoch"]) + 1),
        "BA %": f"{100 * float(last['val/ba']):.2f}",
        "ASR %": f"{100 * float(last['val/asr']):.2f}",
        "wall time": wall_time(log),
        "command": f"`lightning fit --config configs/victims/{config['trainer']['logger']['init_args']['name']}.yaml`",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path)
    rows = [row(p) for p in parser.parse_args().logs]
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r[h] for h in header) + " |")


if __name__ == "__main__":
    main()
