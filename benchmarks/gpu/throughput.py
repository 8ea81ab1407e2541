"""Images per second of each finished row of a sweep summary: training images x epochs / wall time
(the wall includes start-up and validation, so it is a lower bound on the step's own rate).

    python benchmarks/gpu/throughput.py <sweep out>/summary.json --out throughput.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: training images per epoch of the rows of benchmarks/sweeps/gpu_reproduction.yaml (CIFAR-10 minus the
#: 5% reserved split; BTI-DBF (U) trains on the 2,500 reserved images)
IMAGES = {"victim": 47_500, "refine_full": 47_500, "btidbf_u_full": 2_500}


def throughput(summary: dict) -> dict[str, dict[str, float]]:
    rows = {}
    for row in summary["rows"]:
        images = IMAGES.get(row["name"])
        if images is None or not row.get("wall_s"):
            continue
        rows[row["name"]] = {
            "epochs": row["epochs"],
            "wall_s": row["wall_s"],
            "images_per_s": images * row["epochs"] / row["wall_s"],
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summary", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    summary = json.loads(args.summary.read_text())
    result = {"machine": summary.get("machine"), "rows": throughput(summary)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["rows"], indent=1))


if __name__ == "__main__":
    main()
