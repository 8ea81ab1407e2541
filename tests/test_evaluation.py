from __future__ import annotations

import pytest
import torch
from lightning import LightningModule

from lightning_defense.evaluation import BackdoorMetrics


class _Recorder(LightningModule):
    def __init__(self):
        super().__init__()
        self.logged = {}

    def log(self, name, value, **kwargs):
        self.logged[name] = value


def one_hot_logits(predictions: list[int], num_classes: int = 4) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predictions), num_classes).float()


def test_ba_and_asr_on_hand_made_predictions():
    metrics, module = BackdoorMetrics(4, "val"), _Recorder()
    # clean set: 3 of 5 right, split over two batches
    metrics.update(module, one_hot_logits([0, 1, 2]), torch.tensor([0, 1, 3]), dataloader_idx=0)
    metrics.update(module, one_hot_logits([3, 0]), torch.tensor([3, 2]), dataloader_idx=0)
    # poisoned set, attacker's label 0: 3 of 4 land on it
    metrics.update(module, one_hot_logits([0, 0, 1, 0]), torch.tensor([0, 0, 0, 0]), dataloader_idx=1)
    assert set(module.logged) == {"val/ba", "val/asr"}
    assert module.logged["val/ba"].compute().item() == pytest.approx(3 / 5)
    assert module.logged["val/asr"].compute().item() == pytest.approx(3 / 4)


def test_robust_accuracy_counts_poisoned_images_put_in_their_true_class():
    metrics, module = BackdoorMetrics(4, "val"), _Recorder()
    # attacker's label 0; true classes 1, 2, 3, 1: two land on the target, one on its own class,
    # one on neither (the backdoor fired elsewhere, or the trigger broke the image)
    predictions, true = one_hot_logits([0, 0, 3, 2]), torch.tensor([1, 2, 3, 1])
    metrics.update(module, predictions, torch.zeros(4, dtype=torch.long), 1, true_labels=true)
    assert module.logged["val/asr"].compute().item() == pytest.approx(2 / 4)
    assert module.logged["val/ra"].compute().item() == pytest.approx(1 / 4)
    # without true labels (a loader from elsewhere) there is no RA, and the clean set never has one
    other = _Recorder()
    BackdoorMetrics(4, "val").update(other, predictions, torch.zeros(4, dtype=torch.long), 1)
    BackdoorMetrics(4, "val").update(other, predictions, true, 0, true_labels=true)
    assert set(other.logged) == {"val/asr", "val/ba"}


def test_prefix_names_the_undefended_victim():
    metrics = BackdoorMetrics(4, "test", prefix="victim_")
    assert metrics.name(0) == "test/victim_ba" and metrics.name(1) == "test/victim_asr"


def test_epoch_summary_prints_every_epoch_with_only_the_metrics_logged_in_it(caplog):
    import logging
    from types import SimpleNamespace

    from lightning_defense.callbacks import EpochSummary

    metrics = {"train/mask_loss": torch.tensor(0.5), "train/loss": torch.tensor(1.5), "val/ba": torch.tensor(0.25)}
    trainer = SimpleNamespace(current_epoch=0, max_epochs=3, sanity_checking=False, callback_metrics=metrics)
    summary = EpochSummary()
    with caplog.at_level(logging.INFO):
        summary.on_fit_start(trainer, None)
        summary.on_train_epoch_start(trainer, None)
        metrics["train/loss"] = torch.tensor(1.25)  # logged this epoch; no validation, no mask phase
        summary.on_train_epoch_end(trainer, None)
        trainer.current_epoch = 1
        summary.on_train_epoch_start(trainer, None)
        metrics["train/loss"], metrics["val/ba"] = torch.tensor(1.0), torch.tensor(0.5)
        summary.on_train_epoch_end(trainer, None)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 2
    assert "train/loss 1.2500" in lines[0] and "val/ba" not in lines[0] and "mask" not in lines[0]
    assert lines[1].startswith("epoch 1/2") and "val/ba 0.5000" in lines[1] and "mask" not in lines[1]
