"""The configs and victims that ship with the package, usable from any folder.

In a clone they are the repository's ``configs/`` and ``checkpoints/``; in an installed wheel they
are package data (``lightning_defense/configs``, ``lightning_defense/checkpoints``, links to the
same folders in the repository). Two rules make them addressable by name:

- ``--config refine`` (or ``victims/cifar10_badnets``, ``refine/no_supcon.yaml``,
  ``configs/refine.yaml``) names a shipped config when no such file exists where the command runs;
- a relative path ``checkpoints/<file>`` that does not exist where the command runs is the shipped
  file of that name, so the shipped configs' victim paths work outside a clone.

A file of that path in the working folder always wins. Shipped victims are read like any other:
weights only, checked against their schema.
"""

from __future__ import annotations

import json
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # lightning_defense/
#: where shipped victims' measured BA / ASR / RA / ASR-any are kept (benchmarks/shipped_victims.py writes it)
MEASURED = "victims.json"


def _folder(name: str) -> Path | None:
    """The shipped folder: inside the installed package, or the repository's (a clone)."""
    for base in (PACKAGE / name, PACKAGE.parent / name):
        if base.is_dir():
            return base
    return None


def config_path(name: str) -> str:
    """``name`` itself when it is a file, else the shipped config it names (``refine``,
    ``victims/cifar10_badnets``, ``configs/refine.yaml``), else ``name`` unchanged (the CLI then
    says it does not exist)."""
    if Path(name).is_file() or (folder := _folder("configs")) is None:
        return name
    relative = name.removeprefix("configs/")
    for candidate in (relative, f"{relative}.yaml"):
        path = folder / candidate
        if path.is_file():
            return str(path)
    return name


def shipped_configs() -> list[str]:
    """Every shipped config, by the name ``--config`` takes (``refine``, ``victims/cifar10_badnets``)."""
    folder = _folder("configs")
    if folder is None:
        return []
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))


def resolve(path: str | Path) -> Path:
    """``path``, or for a missing relative ``checkpoints/<file>``, the shipped file of that name."""
    path = Path(path)
    if path.exists() or path.is_absolute() or path.parts[:1] != ("checkpoints",):
        return path
    folder = _folder("checkpoints")
    if folder is not None and (folder / Path(*path.parts[1:])).is_file():
        return folder / Path(*path.parts[1:])
    return path


def shipped_victims() -> list[dict]:
    """Every shipped victim file with its SHA-256 and, where measured, its BA / ASR / RA / ASR-any
    (from ``checkpoints/victims.json``; a file whose SHA-256 differs from the measured one has no numbers)."""
    from lightning_defense.io.safetensors_files import sha256
    from lightning_defense.victims import read_victim_metadata

    folder = _folder("checkpoints")
    if folder is None:
        return []
    measured_file = folder / MEASURED
    measured = json.loads(measured_file.read_text())["victims"] if measured_file.is_file() else {}
    rows = []
    for path in sorted(folder.glob("*.safetensors")):
        metadata = read_victim_metadata(path)
        if metadata is None:  # not a victim: IAD's generators, BDMAE's MAE
            continue
        digest = sha256(path)
        entry = measured.get(path.name, {})
        attack = metadata.attack or {}
        rows.append(
            {
                "file": f"checkpoints/{path.name}",
                "sha256": digest,
                "metrics": entry.get("metrics") if entry.get("sha256") == digest else None,
                "arch": metadata.arch,
                "attack": attack["class_path"].rsplit(".", 1)[-1] if attack else "none (clean)",
                "target": attack.get("init_args", {}).get("target"),
            }
        )
    return rows


def is_victim_file(path: Path) -> bool:
    """A victim file of this package (its metadata says so), not another shipped weights file."""
    from lightning_defense.victims import read_victim_metadata

    return read_victim_metadata(path) is not None


def main(args: list[str] | None = None) -> None:
    """``lightning-defense shipped``: the shipped victims and configs."""
    import argparse

    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(
        prog="lightning-defense shipped",
        description="List the victims and configs that ship with the package (usable from any folder).",
    )
    parser.add_argument("--configs", action="store_true", help="list the shipped configs instead of the victims")
    options = parser.parse_args(args)
    console = Console()
    if options.configs:
        for name in shipped_configs():
            console.print(name, highlight=False)
        return
    table = Table(title="Shipped victims, checkpoints/<victim>.safetensors (% on the full test set)")
    table.add_column("victim", no_wrap=True)
    for column in ("arch", "attack", "target", "BA", "ASR", "RA", "ASR-any"):
        table.add_column(column)
    rows = shipped_victims()
    for row in rows:
        metrics = row["metrics"] or {}
        cells = [f"{100 * metrics[k]:.2f}" if k in metrics else "–" for k in ("ba", "asr", "ra", "asr_any")]
        target = "–" if row["target"] is None else str(row["target"])
        table.add_row(Path(row["file"]).stem, row["arch"], row["attack"], target, *cells)
    console.print(table)
    console.print("SHA-256 (as `sha256sum` prints it):", highlight=False)
    for row in rows:  # one line each, whole, so it can be compared or copied
        console.print(f"{row['sha256']}  {row['file']}", highlight=False, soft_wrap=True)
