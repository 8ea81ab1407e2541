"""Issue 8's attack table, in the shape of the seed's tables 1 and 2: one row per attack with the
victim's BA/ASR and, for each defense, BA/ASR/RA/ASR-any after it; plus a bar chart of the same numbers.

It reads the ``summary.json`` files that ``benchmarks/sweep.py`` writes (or the per-row copies
under ``benchmarks/results/``): victim rows are named ``cifar10_<attack>``
(``benchmarks/sweeps/victims_attacks_cpu.yaml``), defense rows ``<attack>_<defense>``
(``benchmarks/sweeps/attacks_defenses_cpu.yaml``; the BTI-DBF table's same-data rows for BadNets,
Blended and WaNet). A row that was not run shows "–".

    python benchmarks/attack_table.py runs/victims_*/summary.json runs/attacks_defenses/summary.json \\
        --out benchmarks/results/attacks_cpu/table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning_defense.metrics import LABELS, REPORTED

DEFENSES = {"refine": "REFINE", "p5": "BTI-DBF (P)", "tmr": "T-MR", "shrinkpad": "ShrinkPad"}
ATTACKS = {
    "badnets": "BadNets",
    "blended": "Blended",
    "wanet": "WaNet",
    "physicalba": "PhysicalBA",
    "batt": "BATT",
    "sig": "SIG",
    "bpp": "BppAttack",
    "adaptive_patch": "Adaptive-Patch",
    "lc": "LC",
    "iad": "IAD",
}


def read_rows(paths: list[Path]) -> dict[str, dict]:
    """Every row of every summary, by name; a later file's row replaces an earlier one's."""
    rows = {}
    for path in paths:
        for row in json.loads(path.read_text())["rows"]:
            if row["last"]:  # a failed or unfinished run has no metrics
                rows[row["name"]] = row
    return rows


def percent(row: dict | None, key: str) -> str:
    return f"{100 * row['last'][key]:.2f}" if row and key in row["last"] else "–"


def minutes(row: dict | None) -> str:
    return f"{row['wall_s'] / 60:.0f}" if row and row.get("wall_s") else "–"


def victim_of(rows: dict[str, dict], attack: str) -> dict | None:
    """The victim's own run, else the victim numbers any defense row measured on the same test sets."""
    if f"cifar10_{attack}" in rows:
        return rows[f"cifar10_{attack}"]
    for defense in DEFENSES:
        row = rows.get(f"{attack}_{defense}")
        if row and "val/victim_ba" in row["last"]:
            last = row["last"]
            return {"last": {"val/ba": last["val/victim_ba"], "val/asr": last["val/victim_asr"]}, "wall_s": None}
    return None


def table(rows: dict[str, dict]) -> str:
    """Victim cells BA / ASR; defense cells every reported metric (evaluation.REPORTED), "–" for one
    a row did not log (ASR-any is newer than most rows)."""
    metrics = " / ".join(LABELS[m] for m in REPORTED)
    header = ["attack", "victim BA / ASR % (train min)"]
    header += [f"{name} {metrics} % (min)" for name in DEFENSES.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for attack, name in ATTACKS.items():
        victim = victim_of(rows, attack)
        if victim is None and not any(f"{attack}_{d}" in rows for d in DEFENSES):
            continue
        cells = [name, f"{percent(victim, 'val/ba')} / {percent(victim, 'val/asr')} ({minutes(victim)})"]
        for defense in DEFENSES:
            row = rows.get(f"{attack}_{defense}")
            values = " / ".join(percent(row, f"val/{m}") for m in REPORTED)
            cells.append(f"{values} ({minutes(row)})" if row else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = [a for a in ATTACKS if victim_of(rows, a) is not None]
    series = {"victim": [victim_of(rows, a) for a in attacks]}
    series |= {name: [rows.get(f"{a}_{d}") for a in attacks] for d, name in DEFENSES.items()}
    width = 0.8 / len(series)
    figure, axes = plt.subplots(2, 1, figsize=(max(6, 1.3 * len(attacks)), 6), sharex=True)
    for axis, key, title in ((axes[0], "val/ba", "BA % (clean test set)"), (axes[1], "val/asr", "ASR %")):
        for i, (name, runs) in enumerate(series.items()):
            values = [100 * r["last"][key] if r and key in r["last"] else float("nan") for r in runs]  # not run: no bar
            axis.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(attacks))], values, width, label=name)
        axis.set_ylabel(title)
        axis.set_ylim(0, 100)
        axis.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(attacks)), [ATTACKS[a] for a in attacks], rotation=20)
    axes[0].legend(ncol=len(series), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summaries", nargs="+", type=Path, help="summary.json files of sweeps")
    parser.add_argument("--out", type=Path, required=True, help="writes <out>.md and <out>.png")
    args = parser.parse_args()
    rows = read_rows(args.summaries)
    markdown = table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(markdown + "\n")
    plot(rows, args.out.with_suffix(".png"))
    print(markdown)


if __name__ == "__main__":
    main()
