"""Neural Cleanse (issue 32, part 3): the anomaly index as published, the cost schedule, the
unlearning batch, detection of the shipped victim's target in a shortened run, and the CLI."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from lightning_defense.cli import main
from lightning_defense.data import EmbeddedCIFAR10DataModule
from lightning_defense.defenses.neural_cleanse import NeuralCleanseModel, anomaly_indices, flagged_target
from lightning_defense.errors import ConfigurationError
from lightning_defense.victims import load_victim

SHIPPED = "checkpoints/cifar10_resnet20_badnets.safetensors"  # BadNets, target 0


def test_the_anomaly_index_is_the_deviation_from_the_median_in_units_of_the_scaled_mad():
    norms = torch.tensor([9.0, 50, 52, 48, 51, 49, 50, 53, 47, 60])
    median = 50.0  # of an even count: the mean of the two middle values (50 and 50)
    mad = 1.4826 * 2.0  # |n - median| = 41, 0, 2, 2, 1, 1, 0, 3, 3, 10: its middle values are 2 and 2
    expected = (norms - median).abs() / mad
    assert torch.allclose(anomaly_indices(norms).float(), expected)
    assert flagged_target(norms) == 0
    # a class far *above* the median is no target: a backdoor makes its class's mask small
    assert flagged_target(torch.tensor([50.0, 52, 48, 51, 49, 50, 53, 47, 50, 200])) == -1
    assert flagged_target(torch.full((10,), 30.0)) == -1  # no spread, no outlier


def shipped_model(**kwargs) -> NeuralCleanseModel:
    return NeuralCleanseModel(load_victim(SHIPPED), (3, 32, 32), **kwargs)


def test_the_cost_grows_after_a_successful_window_and_shrinks_otherwise_keeping_the_smallest_mask():
    model = shipped_model(initial_cost=1e-3, cost_multiplier=2.0)
    hits, counts = torch.zeros(10), torch.full((10,), 10.0)
    hits[3] = 10  # class 3's trigger sent every image of its share to 3
    model.update_costs(hits, counts)
    assert torch.isclose(model.costs[3], torch.tensor(2e-3))
    assert torch.allclose(model.costs[[0, 1, 2]], torch.tensor(1e-3 * 2**-1.5))
    triggers = model.triggers
    assert torch.isclose(triggers.best_norms[3], triggers.mask_norms()[3]) and not triggers.found[0]
    kept = triggers.best_masks[3].clone()
    with torch.no_grad():
        triggers.mask_logits[3] += 1  # a larger mask that succeeds too is not kept
    model.update_costs(hits, counts)
    assert torch.equal(triggers.best_masks[3], kept)
    masks, _ = triggers.final_triggers()  # a class that never succeeded reports its current trigger
    assert torch.equal(masks[0], triggers.masks()[0]) and torch.equal(masks[3], kept)


def test_unlearning_stamps_the_flagged_trigger_on_a_share_of_the_batch_and_keeps_the_labels():
    model = shipped_model(unlearn_fraction=0.25)
    images, labels = torch.rand(8, 3, 32, 32), torch.arange(8) % 10
    with pytest.raises(ConfigurationError, match="nothing to unlearn"):
        model.unlearning_loss(images, labels)
    model.detected_target.fill_(0)
    mask, pattern = (t[0] for t in model.triggers.final_triggers())
    stamped = torch.cat([(1 - mask) * images[:2] + mask * pattern, images[2:]])
    expected = F.cross_entropy(model.repaired(stamped), labels)
    assert torch.allclose(model.unlearning_loss(images, labels)["loss"], expected)


def test_a_shortened_run_flags_the_shipped_victim_s_target():
    torch.manual_seed(0)
    data = EmbeddedCIFAR10DataModule(reserved_fraction=0.0)
    data.setup()
    pick = torch.randperm(len(data.train_set.images), generator=torch.Generator().manual_seed(0))[:256]
    images = data.train_set.images[pick].float() / 255
    model = shipped_model()
    optimizer = torch.optim.Adam(model.triggers.parameters(), lr=0.1, betas=(0.5, 0.9))
    window_hits, window_counts = torch.zeros(10), torch.zeros(10)
    for step in range(30):
        batch = images[(step % 4) * 64 : (step % 4 + 1) * 64]
        losses, hits, counts = model.inversion_loss(batch)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        window_hits, window_counts = window_hits + hits, window_counts + counts
        if step % 5 == 4:
            model.update_costs(window_hits, window_counts)
            window_hits, window_counts = torch.zeros(10), torch.zeros(10)
    assert model.detect() == 0
    norms = model.triggers.final_norms()
    assert norms[0] == norms.min() and anomaly_indices(norms)[0] > 2


def test_the_cli_runs_detection_then_unlearning_and_logs_what_btidbf_logs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning"])
    short = [
        "--trainer.limit_train_batches",
        "1",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.max_epochs",
        "3",
        "--trainer.log_every_n_steps",
        "1",
    ]
    # threshold 0 flags the smallest mask whatever it is: the phases run in a few steps
    main(["fit", "--config", "neural_cleanse", "--model.init_args.inversion_epochs", "2",
          "--model.init_args.anomaly_threshold", "0", "--trainer.check_val_every_n_epoch", "1",
          "--trainer.enable_progress_bar", "false", *short])  # fmt: skip
    run = tmp_path / "runs" / "neural_cleanse" / "version_0"
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/anomaly_index", "val/detected_target", "val/dsr", "val/ba", "val/asr", "val/ra"} <= set(header)
    assert {"train/inversion_loss", "train/unlearning_loss"} <= set(header)
    assert (run / "repaired_victim.safetensors").exists() and list((run / "transforms").glob("*.png"))
