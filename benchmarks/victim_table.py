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
    if "Victim written to" not in log:
        raise SystemExit(f"{log_path}: no finished run in this log")
    run = run_folder(log_path)
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


def run_folder(log_path: Path) -> Path:
    match = re.search(r"Victim written to (\S+)/victim\.safetensors", log_path.read_text(errors="replace"))
    return Path(match.group(1))


def plot(logs: list[Path], out: Path) -> None:
    """BA and ASR per epoch, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ba_axis, asr_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    for log in logs:
        run = run_folder(log)
        rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val/ba")]
        epochs = [int(r["epoch"]) + 1 for r in rows]
        label = row(log)["attack"]
        ba_axis.plot(epochs, [100 * float(r["val/ba"]) for r in rows], marker=".", label=label)
        asr_axis.plot(epochs, [100 * float(r["val/asr"]) for r in rows], marker=".", label=label)
    for axis, name in ((ba_axis, "BA %"), (asr_axis, "ASR %")):
        axis.set_xlabel("epoch")
        axis.set_ylabel(name)
        axis.set_ylim(0, 100)
        axis.grid(alpha=0.3)
    asr_axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path)
    parser.add_argument("--plot", type=Path, help="also save BA/ASR per epoch as this PNG")
    args = parser.parse_args()
    if args.plot:
        plot(args.logs, args.plot)
    rows = [row(p) for p in args.logs]
    header = list(rows[0])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r[h] for h in header) + " |")


if __name__ == "__main__":
    main()
