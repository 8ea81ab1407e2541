"""ShrinkPad: the transform and the module run through `lightning validate`."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import torch

from lightning_defense.defenses.shrinkpad import ShrinkPadTransform

REPO = Path(__file__).resolve().parents[1]


def test_shrinkpad_keeps_the_size_and_pads_a_random_frame_of_zeros():
    torch.manual_seed(0)
    images = torch.rand(64, 3, 32, 32) * 0.9 + 0.1  # no zero pixels of their own
    out = ShrinkPadTransform(shrink=4)(images)
    assert out.shape == images.shape
    zero_rows = (out == 0).all(dim=(1, 3)).sum(dim=1)  # per image, rows that are all padding
    zero_cols = (out == 0).all(dim=(1, 2)).sum(dim=1)
    assert torch.equal(zero_rows, torch.full((64,), 4)) and torch.equal(zero_cols, torch.full((64,), 4))
    tops = (out == 0).all(dim=(1, 3))[:, :4].sum(dim=1)  # padding above the image: the random offset
    assert len(tops.unique()) > 2  # offsets differ between images
    assert torch.isclose(out[out > 0].mean(), images.mean(), atol=0.02)  # the content is the image, resized


def test_shrinkpad_validates_the_shipped_victim_through_the_cli(tmp_path):
    command = [
        sys.executable, "-m", "lightning_defense", "validate", "--config", str(REPO / "configs" / "shrinkpad.yaml"),
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    row = next(csv.DictReader(next(tmp_path.glob("shrinkpad/version_0/metrics.csv")).open()))
    assert float(row["val/victim_asr"]) > 0.9  # the shipped BadNets victim
    assert float(row["val/asr"]) < float(row["val/victim_asr"])  # moving the patch weakens it
