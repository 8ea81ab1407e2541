"""T-MR: the learned border, and the baseline trained through the CLI and exported like REFINE."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_defense.defenses.components import BorderPerturbation
from lightning_defense.defenses.refine import load_defended
from lightning_defense.defenses.tmr import TMR
from lightning_defense.errors import ConfigurationError

REPO = Path(__file__).resolve().parents[1]


def test_border_frames_the_shrunk_image_with_one_learned_pattern():
    border = BorderPerturbation(image_size=32, border=4)
    with torch.no_grad():
        border.perturbation.normal_()
    images = torch.rand(3, 3, 32, 32)
    out = border(images)
    inner = torch.nn.functional.interpolate(images, size=(24, 24), mode="bilinear", antialias=True)
    torch.testing.assert_close(out[..., 4:28, 4:28], inner)
    frame = out * border.mask
    assert torch.equal(frame[0], frame[1]) and frame.abs().sum() > 0  # universal, and not empty
    images.requires_grad_(True)
    border(images).sum().backward()
    assert border.perturbation.grad[..., :4, :].abs().sum() > 0  # the frame learns
    assert border.perturbation.grad[..., 4:28, 4:28].abs().sum() == 0  # the image area is the image
    with pytest.raises(ConfigurationError, match="image_size"):
        border(torch.rand(1, 3, 28, 28))


def test_tmr_trains_through_the_cli_and_exports(tmp_path):
    command = [
        sys.executable, "-m", "lightning_defense", "fit", "--config", str(REPO / "configs" / "tmr.yaml"),
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
        "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "tmr" / "version_0"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert any(row.get("val/asr") for row in rows) and "train/classification" in rows[0]
    trained = TMR.load_from_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=True).eval()
    assert trained.model.transform_net.perturbation.abs().sum() > 0  # the border moved from grey
    deployed = load_defended(run / "defended.safetensors", victim_path=REPO / trained.hparams.victim)
    assert isinstance(deployed.transform_net, BorderPerturbation)
    images = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(deployed(images), trained(images).float(), atol=1e-5, rtol=0)
