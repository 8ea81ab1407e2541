"""Copy the feature views of a `benchmarks/sweeps/feature_views.yaml` sweep into the docs.

Each finished row's figure (``runs/<row>/version_*/features/*_tsne.png``, the newest version)
becomes ``docs/figures/features/<row>.png``, which ``docs/feature-views.md`` shows.

    python benchmarks/sweep.py benchmarks/sweeps/feature_views.yaml --out <out> --threads 1
    python benchmarks/feature_views.py <out>
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "docs" / "figures" / "features"


def copy_views(out: Path) -> list[Path]:
    """The copied figures; rows without a finished run (``logs/<row>.time``) are left out."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    copied = []
    for finished in sorted((out / "logs").glob("*.time")):
        row = finished.name.removesuffix(".time")
        views = sorted((out / "runs" / row).glob("version_*/features/*_tsne.png"), key=lambda p: p.stat().st_mtime)
        if views:
            copied.append(Path(shutil.copyfile(views[-1], FIGURES / f"{row}.png")))
    return copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the sweep's --out folder")
    for path in copy_views(parser.parse_args().out):
        print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
