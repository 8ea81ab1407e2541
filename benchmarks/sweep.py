"""Run several `lightning fit` variants of one config side by side and tabulate them.

A variants file (YAML) maps a row name to the command-line arguments that make the variant,
on top of the base config(s):

    base: [configs/refine.yaml]
    variants:
      default: []
      no_supcon: [--config, configs/refine/no_supcon.yaml]
      bce: [--model.init_args.classification_loss, bce]

    python benchmarks/sweep.py benchmarks/sweeps/refine_embedded.yaml --jobs 2 --out benchmarks/results/sweep

Every run writes its Lightning folder under ``<out>/runs/<name>/`` and its output to
``<out>/logs/<name>.log``. At the end ``<out>/summary.json`` holds, per row, the exact command,
the wall time, the last validation metrics and the per-epoch ``val/ba``/``val/asr``; the table
is printed as Markdown (also written to ``summary.md``) and ``ba_asr.png`` plots the curves.
A ``subcommand`` key (default ``fit``) runs another one for every row, e.g. ``validate`` for
test-time defenses that train nothing (BDMAE); one row may name its own, as a mapping
``name: {subcommand: validate, args: [...]}``, so trained and test-time defenses share a table.
Rows already finished (``logs/<name>.time``, written only when a run exits 0) are not run again,
and an interrupted row resumes from its ``last.ckpt`` (wall times summed over the attempts), so
an interrupted sweep continues where it stopped. ``--seeds 0 1 2`` runs every row once per
seed (``<row>_seed<k>``, ``--seed_everything k``) and adds a ``mean ± std`` line per row to the
table; a row for another attack target is a row with another victim file. ``--summary-only`` runs nothing and
tabulates the rows already finished under ``--out`` (unfinished ones are named and left out), for
a sweep that was interrupted or whose rows were run one ``--only`` at a time. ``--keep
<summary.json>`` carries the finished rows of an earlier sweep (another machine or session whose
run folders are gone) into this table, each with its own command and machine, and does not run them again.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from machine_info import machine

from lightning_defense.metrics import LABELS, REPORTED
from lightning_defense.study import run_logged, summarize
from lightning_defense.training.hardware import worker_environment


def flatten(args: list) -> list[str]:
    """A row's arguments; nested lists (YAML anchors shared between rows) are spliced in."""
    return [str(b) for a in args for b in (flatten(a) if isinstance(a, list) else [a])]


def command(base: list[str], extra: list[str], out: Path, name: str, subcommand: str = "fit") -> list[str]:
    configs = [arg for config in base for arg in ("--config", config)]
    logger = ["--trainer.logger.init_args.save_dir", str(out / "runs"), "--trainer.logger.init_args.name", name]
    return ["lightning", subcommand, *configs, *extra, *logger]


def row_commands(
    spec: dict, extra: list[str], out: Path, only: list[str] | None = None, seeds: list[int] | None = None
) -> dict[str, list[str]]:
    """The command of every run: a row per variant (``only`` these), once per seed when ``seeds``."""
    commands = {}
    for name, value in spec["variants"].items():
        if only and name not in only:
            continue
        row = value if isinstance(value, dict) else {"args": value}
        subcommand = row.get("subcommand", spec.get("subcommand", "fit"))
        row_args = flatten(row.get("args") or []) + extra
        for seed in seeds or [None]:
            run = name if seed is None else f"{name}_seed{seed}"
            seeded = row_args if seed is None else [*row_args, "--seed_everything", str(seed)]
            commands[run] = command(spec["base"], seeded, out, run, subcommand)
    return commands


def ran(name: str, planned: list[str], out: Path) -> str:
    """The command a row last ran with (``logs/<name>.argv.json``): a summary made later, or with
    other extra arguments, records what ran, not what this call would run."""
    started = out / "logs" / f"{name}.argv.json"
    return shlex.join(["lightning", *json.loads(started.read_text())] if started.is_file() else planned)


def table(results: list[dict]) -> str:
    keys = ["val/victim_ba", "val/victim_asr", *(f"val/{m}" for m in REPORTED), "val/inner_asr_any"]
    header = (
        "| row | epochs | wall | victim BA % | victim ASR % | "
        + " | ".join(f"{LABELS[m]} %" for m in REPORTED)
        + " | ASR-any behind the map % | best BA % (after epoch) |"
    )
    # trigger-inversion defenses (BTI-DBF) also report the detected target, detection and phase times
    detection = any("val/dsr" in r["last"] for r in results)
    if detection:
        header += " detected target (DSR) | detection F1 % | (pretrain /) mask / generator / vote / defense min |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        values = [f"{100 * r['last'][k]:.2f}" if k in r["last"] else "–" for k in keys]
        ba = r["curves"].get("val/ba", [])
        epochs = r.get("validated_after_epoch") or range(1, len(ba) + 1)  # older summaries: every epoch
        best = f"{100 * max(ba):.2f} ({epochs[ba.index(max(ba))]})" if ba else "–"
        wall = f"{r['wall_s'] / 60:.1f} min" if r["wall_s"] else "–"
        line = f"| {r['name']} | {r['epochs']} | {wall} | {' | '.join(values)} | {best} |"
        if detection:
            last, phases = r["last"], r.get("phase_seconds") or {}
            target = f"{last['val/detected_target']:.0f} ({last['val/dsr']:.0f})" if "val/dsr" in last else "–"
            f1 = f"{100 * last['val/detection_f1']:.2f}" if "val/detection_f1" in last else "–"
            order = ("pretrain", "mask", "generator", "detect", "defense")
            times = " / ".join(f"{phases[p] / 60:.1f}" for p in order if p in phases)
            line += f" {target} | {f1} | {times or '–'} |"
        lines.append(line)
    return "\n".join(lines)


def seed_rows(results: list[dict]) -> str:
    """``mean ± std`` (sample std) over the seeds of each row, for the metrics of :func:`table`."""
    keys = ["val/victim_ba", "val/victim_asr", *(f"val/{m}" for m in REPORTED), "val/inner_asr_any"]
    groups: dict[str, list[dict]] = {}
    for r in results:
        base, _, seed = r["name"].rpartition("_seed")
        if base and seed.isdigit():
            groups.setdefault(base, []).append(r)
    header = "| row (seeds) | " + " | ".join(k.removeprefix("val/") + " %" for k in keys) + " |"
    lines = [header, "|" + "---|" * (len(keys) + 1)]
    for base, runs in groups.items():
        cells = []
        for key in keys:
            values = torch.tensor([100 * r["last"][key] for r in runs if key in r["last"]], dtype=torch.float64)
            if len(values) == 0:
                cells.append("–")
            else:
                spread = f" ± {values.std().item():.2f}" if len(values) > 1 else ""
                cells.append(f"{values.mean().item():.2f}{spread}")
        seeds_run = sorted(int(r["name"].rpartition("_seed")[2]) for r in runs)
        lines.append(f"| {base} ({', '.join(map(str, seeds_run))}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kept_rows(summary: Path, commands: dict[str, list[str]]) -> dict[str, dict]:
    """The rows of an earlier sweep's summary that this sweep would run, each with its machine."""
    earlier = json.loads(summary.read_text())
    return {
        row["name"]: {**row, "machine": row.get("machine", earlier.get("machine"))}
        for row in earlier["rows"]
        if row["name"] in commands
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        for ax, key in ((left, "val/ba"), (right, "val/asr")):
            values = r["curves"].get(key, [])
            ax.plot(r["validated_after_epoch"][: len(values)], [100 * v for v in values], label=r["name"])
    for ax, title in ((left, "defended BA %"), (right, "defended ASR %")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", type=Path, help="YAML with `base` (config list) and `variants` (name: args)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS per run (0: the caller's if set, else the cores divided between the jobs)",
    )
    parser.add_argument("--only", nargs="*", help="run just these rows")
    parser.add_argument("--seeds", type=int, nargs="*", help="run every row once per seed (mean ± std in the table)")
    parser.add_argument("--summary-only", action="store_true", help="run nothing: tabulate the rows already in --out")
    parser.add_argument(
        "--keep", type=Path, help="an earlier sweep's summary.json: its finished rows join the table, not run again"
    )
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    extra = argv[split + 1 :]  # after `--`: arguments for every run

    spec = yaml.safe_load(args.variants.read_text())
    planned = row_commands(spec, extra, args.out, args.only, args.seeds)
    kept = kept_rows(args.keep, planned) if args.keep else {}
    commands = {name: cmd for name, cmd in planned.items() if name not in kept}
    if args.summary_only:
        unfinished = [name for name in commands if not (args.out / "logs" / f"{name}.time").is_file()]
        started = [name for name in unfinished if (args.out / "runs" / name).is_dir()]
        if started:
            print(f"--summary-only: not finished, left out: {', '.join(started)}", file=sys.stderr)
        commands = {name: cmd for name, cmd in commands.items() if name not in unfinished}
        if not commands and not kept:
            parser.error(f"--summary-only: no row of {args.variants} has finished under {args.out}")
    sweep_wall_s = threads_per_run = None
    if not args.summary_only:
        (args.out / "logs").mkdir(parents=True, exist_ok=True)
        env = worker_environment(args.jobs, args.threads)
        threads_per_run = env["OMP_NUM_THREADS"]
        start = time.monotonic()
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda item: run_logged(item[0], item[1][1:], args.out, env, tag="sweep"), commands.items()))
        sweep_wall_s = time.monotonic() - start
    here = machine()
    measured = {
        name: {**summarize(name, ran(name, cmd, args.out), args.out), "machine": here} for name, cmd in commands.items()
    }
    results = [kept.get(name) or measured[name] for name in planned if name in kept or name in measured]
    summary = {
        "machine": here,
        "jobs": args.jobs,
        "threads_per_run": threads_per_run,
        "sweep_wall_s": sweep_wall_s,
        "argv": sys.argv,
        "rows": results,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    markdown = table(results)
    if args.seeds:
        markdown += "\n\n" + seed_rows(results)
    (args.out / "summary.md").write_text(markdown + "\n")
    plot(results, args.out / "ba_asr.png")
    print(markdown)


if __name__ == "__main__":
    main()
