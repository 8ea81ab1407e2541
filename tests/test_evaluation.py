from __future__ import annotations

import pytest
import torch
from lightning import LightningModule

from lightning_defense.metrics import BackdoorMetrics


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


def test_asr_any_counts_a_backdoor_moved_to_another_class():
    """A label map that sends every poisoned image to class 3 instead of the target 0: ASR reads 0,
    ASR-any 100%; a removed backdoor leaves only the clean errors' largest class share."""
    true = torch.tensor([1, 2, 1, 2, 1, 2, 1, 2, 1, 2])
    moved, module = BackdoorMetrics(4, "val"), _Recorder()
    moved.update(module, one_hot_logits([3] * 10), torch.zeros(10, dtype=torch.long), 1, true_labels=true)
    assert module.logged["val/asr"].compute().item() == 0
    assert module.logged["val/asr_any"].compute().item() == pytest.approx(1.0)
    assert module.logged["val/ra"].compute().item() == 0
    # removed: 7 right, errors into 0 (the target), 3, 3: the largest share is class 3's 2 of 10
    removed, module = BackdoorMetrics(4, "val"), _Recorder()
    predictions = one_hot_logits([1, 2, 1, 2, 1, 2, 1, 0, 3, 3])
    removed.update(module, predictions, torch.zeros(10, dtype=torch.long), 1, true_labels=true)
    assert module.logged["val/asr_any"].compute().item() == pytest.approx(2 / 10)
    assert module.logged["val/ra"].compute().item() == pytest.approx(7 / 10)
    # an image put in its own class counts for no class, even when that class is where others go
    own, module = BackdoorMetrics(4, "val"), _Recorder()
    own.update(
        module, one_hot_logits([1, 1, 1]), torch.zeros(3, dtype=torch.long), 1, true_labels=torch.tensor([1, 2, 2])
    )
    assert module.logged["val/asr_any"].compute().item() == pytest.approx(2 / 3)


def test_the_victim_behind_an_identity_transform_is_the_victim(tmp_path):
    """REFINE's inner metrics (the victim's answer on T(x), before the map) equal the victim's own
    ASR and ASR-any when T is the identity, whatever the permutation does to the defended output."""
    from lightning_defense.attacks import BadNets
    from lightning_defense.defenses import REFINE
    from lightning_defense.victims import Classifier
    from lightning_defense.victims.victim_file import VictimMetadata, save_victim

    torch.manual_seed(0)
    path = save_victim(
        tmp_path / "v.safetensors",
        Classifier("resnet20", 10),
        VictimMetadata("resnet20", 10, attack=BadNets().config()),
    )
    module = REFINE(str(path), encoder_depth=3, decoder_channels=[16, 8, 4])
    module.model.transform_net = torch.nn.Identity()
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    images = torch.rand(32, 3, 32, 32)
    with torch.no_grad():
        answers = module.victim(images).argmax(1)
    target = int(answers.mode().values)  # the victim's most common answer: a nonzero ASR
    true = (answers + 1 + torch.arange(32) % 9) % 10  # true classes the victim misses...
    true[:4] = answers[:4]  # ...but for four, which count for no class
    with torch.no_grad():
        module._evaluate((images, torch.full((32,), target), true), 1, "val")
    for name in ("asr", "asr_any"):
        inner, victim = logged[f"val/inner_{name}"].compute(), logged[f"val/victim_{name}"].compute()
        assert inner.item() == pytest.approx(victim.item()) and victim.item() > 0
    assert logged["val/asr"].compute().item() != pytest.approx(logged["val/victim_asr"].compute().item())


def test_a_transform_that_copies_its_input_keeps_the_backdoor_in_asr_any():
    """Issue 29's failure caught by the metric: T = identity and a label permutation M move every
    triggered image that fires the victim to M(target). The defended ASR then reads ~0, while the
    relabel-proof ASR of the defended model equals the victim's ASR."""
    from lightning_defense.defenses.refine import LabelPermutation, RefineModel, TransformNet
    from lightning_defense.victims import Classifier

    torch.manual_seed(0)
    refine = RefineModel(Classifier("resnet20", 10), TransformNet("resnet18", 3, (16, 8, 4)), LabelPermutation(10))
    refine.transform_net = torch.nn.Identity()
    images = torch.rand(64, 3, 32, 32)
    with torch.no_grad():
        answers, defended = refine.victim(images).argmax(1), refine(images)
    target = int(answers.mode().values)  # the class the "backdoor" sends most images to
    moved_to = int((refine.label_permutation.permutation == target).nonzero())  # M(target)
    assert torch.equal(defended.argmax(1)[answers == target], torch.full_like(answers[answers == target], moved_to))
    # true classes that are neither the target nor M(target): every landing counts as the attack's
    others = torch.tensor([c for c in range(10) if c not in (target, moved_to)])
    true = others[torch.arange(64) % len(others)]
    victim, defense = (BackdoorMetrics(10, "val"), _Recorder()), (BackdoorMetrics(10, "val"), _Recorder())
    victim[0].update(victim[1], refine.victim(images), torch.full((64,), target), 1, true_labels=true)
    defense[0].update(defense[1], defended, torch.full((64,), target), 1, true_labels=true)
    victim_asr = victim[1].logged["val/asr"].compute().item()
    assert victim_asr > 0.2 and defense[1].logged["val/asr"].compute().item() == 0
    assert defense[1].logged["val/asr_any"].compute().item() == pytest.approx(victim_asr)


def test_prefix_names_the_undefended_victim():
    metrics = BackdoorMetrics(4, "test", prefix="victim_")
    assert metrics.name(0) == "test/victim_ba" and metrics.name(1) == "test/victim_asr"


def test_epoch_summary_prints_every_epoch_with_only_the_metrics_logged_in_it(caplog):
    import logging
    from types import SimpleNamespace

    from lightning_defense.training.callbacks import EpochSummary

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
