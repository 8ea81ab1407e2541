"""A study's results: ``results.csv``, ``results.md`` (aux kinds x defenses) and ``results.png``."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

from lightning_defense.metrics import LABELS, REPORTED
from lightning_defense.training.callbacks import PLOTS_MISSING

METRICS = (*(f"val/{m}" for m in REPORTED), *(f"val/victim_{m}" for m in REPORTED))


def write_results(results: list[dict[str, Any]], out: Path) -> None:
    """``results.csv`` (a line a cell), ``results.md`` (BA / ASR, aux kinds x defenses) and ``results.png``."""
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["cell", "defense", "aux_data", "gic", *(m.split("/")[1] for m in METRICS), "epochs", "wall_s", "command"]
        )
        for r in results:
            values = [f"{100 * r['last'][m]:.2f}" if m in r["last"] else "" for m in METRICS]
            writer.writerow(
                [r["name"], r["defense"], r["aux"], r["gic"], *values, r["epochs"], r["wall_s"] or "", r["command"]]
            )
    (out / "results.md").write_text(markdown_table(results) + "\n")
    try:
        plot_results(results, out / "results.png")
    except ImportError:  # the plots extra is optional: the table is the result, the figure a view of it
        print(f"results.png not drawn: {PLOTS_MISSING}.", file=sys.stderr)


def _cell_text(result: dict[str, Any] | None) -> str:
    if result is None or "val/ba" not in result["last"]:
        return "–"
    return " / ".join(
        f"{100 * result['last'][f'val/{m}']:.2f}" if f"val/{m}" in result["last"] else "–" for m in REPORTED
    )


def markdown_table(results: list[dict[str, Any]]) -> str:
    """Rows: kinds of auxiliary data; columns: defense (and GIC); cells: BA / ASR / RA / ASR-any %."""
    by_key = {(r["defense"], r["aux"], r["gic"]): r for r in results}
    columns = list(dict.fromkeys((r["defense"], r["gic"]) for r in results))
    names = [f"{d} + GIC" if g else d for d, g in columns]
    lines = ["| aux data | " + " | ".join(names) + " |", "|---|" + "---|" * len(columns)]
    for aux in dict.fromkeys(r["aux"] for r in results):
        lines.append(f"| {aux} | " + " | ".join(_cell_text(by_key.get((d, aux, g))) for d, g in columns) + " |")
    victim = next((r["last"] for r in results if "val/victim_ba" in r["last"]), None)
    if victim:
        lines.append(
            f"\n{' / '.join(LABELS[m] for m in REPORTED)} % of the defended model; the victim: "
            + " / ".join(
                f"{LABELS[m]} {100 * victim[f'val/victim_{m}']:.2f}" for m in REPORTED if f"val/victim_{m}" in victim
            )
            + "."
        )
    return "\n".join(lines)


def plot_results(results: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: one panel per defense and metric, a group per kind of data, a bar per GIC setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defenses = list(dict.fromkeys(r["defense"] for r in results))
    auxes = list(dict.fromkeys(r["aux"] for r in results))
    settings = sorted({r["gic"] for r in results})
    by_key = {(r["defense"], r["aux"], r["gic"]): r for r in results}
    rows = [(f"val/{m}", f"{LABELS[m]} %") for m in REPORTED]
    figure, axes = plt.subplots(
        len(rows), len(defenses), figsize=(4.5 * len(defenses), 3.25 * len(rows)), squeeze=False, sharey="row"
    )
    width = 0.8 / len(settings)
    for col, defense in enumerate(defenses):
        for row, (metric, title) in enumerate(rows):
            ax = axes[row][col]
            for i, gic in enumerate(settings):
                heights = [
                    100 * by_key.get((defense, a, gic), {"last": {}})["last"].get(metric, float("nan")) for a in auxes
                ]
                positions = [x + (i - (len(settings) - 1) / 2) * width for x in range(len(auxes))]
                bars = ax.bar(positions, heights, width, label="with GIC" if gic else "without GIC")
                ax.bar_label(bars, fmt="%.1f", fontsize=6)
            ax.set_ylim(0, 105)
            ax.set_xticks(range(len(auxes)), auxes, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{defense}: {title}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
