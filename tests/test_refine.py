from __future__ import annotations

import math

import pytest
import torch

from lightning_defense.defenses.refine import (
    REFINE,
    LabelPermutation,
    RefineModel,
    TransformNet,
    derangement,
    supervised_contrastive_loss,
)
from lightning_defense.victims import Classifier


@pytest.mark.parametrize("num_classes", [2, 3, 10, 43])
def test_permutation_is_a_seeded_derangement(num_classes):
    permutation = derangement(num_classes, seed=5)
    assert sorted(permutation.tolist()) == list(range(num_classes))
    assert not (permutation == torch.arange(num_classes)).any()
    assert torch.equal(permutation, derangement(num_classes, seed=5))


def test_permutation_survives_save_and_load():
    saved = LabelPermutation(10, seed=1)
    loaded = LabelPermutation(10, seed=2)
    assert not torch.equal(saved.permutation, loaded.permutation)
    loaded.load_state_dict(saved.state_dict())
    assert torch.equal(saved.permutation, loaded.permutation)
    logits = torch.randn(3, 10)
    assert torch.equal(loaded(logits)[:, 4], logits[:, saved.permutation[4]])


def slow_supcon(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    z = torch.nn.functional.normalize(features.flatten(1), dim=1)
    total, anchors = 0.0, 0
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[a]) / temperature) for a in range(len(z)) if a != i)
        total += -sum(float(z[i] @ z[p]) / temperature - math.log(denominator) for p in positives) / len(positives)
        anchors += 1
    return torch.tensor(total / anchors)


def test_supcon_matches_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(9, 3, 4, 4, generator=generator)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0])  # class 2 has no positive
    fast = supervised_contrastive_loss(features, labels, temperature=0.5)
    assert fast.item() == pytest.approx(slow_supcon(features, labels, 0.5).item(), rel=1e-5)


def test_supcon_is_lower_when_same_label_samples_are_closer():
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 32, generator=generator)
    labels = torch.arange(4).repeat_interleave(4)
    tight = centres[labels] + 0.05 * torch.randn(16, 32, generator=generator)
    loose = centres[labels] + 2.0 * torch.randn(16, 32, generator=generator)
    assert supervised_contrastive_loss(tight, labels) < supervised_contrastive_loss(loose, labels)


@pytest.mark.parametrize(
    "encoder, depth, channels",
    [("resnet18", 3, (64, 32, 16)), ("resnet18", 4, (64, 32, 16, 8)), ("vgg11_bn", 4, (64, 32, 16, 8))],
)
def test_transform_net_keeps_size_and_range_and_every_parameter_learns(encoder, depth, channels):
    torch.manual_seed(0)
    net = TransformNet(encoder, depth, channels)
    images = torch.rand(2, 3, 32, 32)
    out = net(images)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())  # DDP needs every parameter used
    # pruning removed nothing the forward pass needs: the state dict alone rebuilds the same T
    torch.manual_seed(1)
    rebuilt = TransformNet(encoder, depth, channels)
    rebuilt.load_state_dict(net.state_dict())
    assert torch.allclose(rebuilt.eval()(images), net.eval()(images))


@pytest.mark.parametrize("output_activation", ["sigmoid", "clamp"])
def test_residual_transform_starts_at_the_identity_and_learns(output_activation):
    net = TransformNet("resnet18", 3, (16, 8, 4), output_activation=output_activation, residual=True)
    images = torch.rand(4, 3, 32, 32).clamp(0.01, 0.99)  # the sigmoid's logit round trip is exact inside
    out = net(images)
    assert torch.allclose(out, images, atol=1e-5)
    out.square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert net.unet.segmentation_head[0].weight.grad.abs().sum() > 0  # the zero-initialized head learns first


def test_residual_transform_passes_finite_gradients_to_its_input_under_bf16():
    """BTI-DBF chains two residual UNets (purifier after generator), so gradients flow into T's input;
    bf16 once rounded 1 - eps to 1 and turned the logit's gradient into NaN for bright pixels."""
    net = TransformNet("resnet18", 3, (16, 8, 4), residual=True)
    images = torch.rand(4, 3, 32, 32)
    images[:, :, :4] = 1.0  # saturated pixels, as a generator's sigmoid produces
    images.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(images)
    out.float().square().sum().backward()
    assert torch.isfinite(images.grad).all()


def test_clamped_transform_stays_in_range_and_passes_no_gradient_outside_it():
    net = TransformNet("resnet18", 3, (16, 8, 4), output_activation="clamp")
    with torch.no_grad():
        net.unet.segmentation_head[0].bias.fill_(5.0)  # push every pixel above 1
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = net(images)
    assert torch.equal(out, torch.ones_like(out))
    out.sum().backward()
    assert images.grad.abs().sum() == 0


@pytest.mark.parametrize("classification_loss", ["ce", "bce", "soft"])
def test_every_loss_form_runs_under_bf16_autocast(classification_loss):
    # autocast refuses binary_cross_entropy outright; the bce form must leave autocast for it
    refine = make_refine(classification_loss=classification_loss)
    with torch.autocast("cpu", torch.bfloat16):
        losses = refine.loss(torch.rand(8, 3, 32, 32))
    assert torch.isfinite(losses["loss"]) and losses["classification"].dtype == torch.float32


def make_refine(**kwargs) -> RefineModel:
    torch.manual_seed(0)
    return RefineModel(
        Classifier("resnet20", 10), TransformNet("resnet18", 3, (32, 16, 8)), LabelPermutation(10), **kwargs
    )


@pytest.mark.parametrize("classification_loss", ["ce", "bce", "soft"])
def test_one_step_changes_t_and_leaves_the_victim_untouched(classification_loss):
    refine = make_refine(classification_loss=classification_loss)
    refine.train()
    assert not refine.victim.training
    victim_before = {k: v.clone() for k, v in refine.victim.state_dict().items()}
    t_before = [p.clone() for p in refine.transform_net.parameters()]
    optimizer = torch.optim.SGD(refine.transform_net.parameters(), lr=0.1)
    losses = refine.loss(torch.rand(8, 3, 32, 32))
    assert set(losses) == {"loss", "classification", "contrastive"}
    losses["loss"].backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(t_before, refine.transform_net.parameters()))
    # weights and BatchNorm buffers (running means, counts) alike
    assert all(torch.equal(victim_before[k], v) for k, v in refine.victim.state_dict().items())


def test_the_victim_labels_the_images_as_they_are_and_t_learns_on_augmented_ones():
    # a victim whose answer an augmentation changes: it fires "class 0" on gray images, as the
    # WaNet victim fires on resampled ones; labels taken after augmenting would teach T that
    seen_by_t = []

    class GrayIt(torch.nn.Module):
        def forward(self, images):
            return images.mean(dim=1, keepdim=True).expand_as(images)

    class SpyT(TransformNet):
        def forward_with_head(self, images):
            seen_by_t.append(images)
            return super().forward_with_head(images)

    torch.manual_seed(0)
    victim = Classifier("resnet20", 10)
    t = SpyT("resnet18", 3, (32, 16, 8))
    refine = RefineModel(victim, t, LabelPermutation(10), classification_loss="ce", augmentation=GrayIt())
    images = torch.rand(8, 3, 32, 32)
    labels_of_raw = victim(images).argmax(1)
    assert not torch.equal(labels_of_raw, victim(GrayIt()(images)).argmax(1))  # the test can tell them apart
    pseudo_labels = []
    classification = refine.classification

    def spy(logits, victim_logits, labels):
        pseudo_labels.append(labels)
        return classification(logits, victim_logits, labels)

    refine.classification = spy
    refine.loss(images)
    assert torch.equal(pseudo_labels[0], labels_of_raw)
    assert torch.equal(seen_by_t[0], GrayIt()(images))


def test_refine_refuses_a_data_module_that_augments_before_the_victim_labels(tmp_path):
    from lightning_defense.attacks import BadNets
    from lightning_defense.data import DefenseDataModule, EmbeddedCIFAR10DataModule, SeenData
    from lightning_defense.data.augmentation import RefineAugmentation
    from lightning_defense.errors import ConfigurationError
    from lightning_defense.victims import VictimMetadata, save_victim

    victim_path = tmp_path / "victim.safetensors"
    save_victim(victim_path, Classifier("resnet20", 10), VictimMetadata("resnet20", 10, attack=BadNets().config()))
    module = REFINE(str(victim_path), encoder_depth=3, decoder_channels=(16, 8, 4))
    data = DefenseDataModule(EmbeddedCIFAR10DataModule(), SeenData(), augmentation=RefineAugmentation())
    module.trainer = type("Trainer", (), {"datamodule": data})()
    with pytest.raises(ConfigurationError, match="Remove data.init_args.augmentation"):
        module.setup("fit")


def test_soft_loss_is_zero_only_when_the_defended_model_matches_the_victims_distribution():
    refine = make_refine(classification_loss="soft", soft_label_temperature=4.0)
    victim_logits = torch.randn(6, 10) * 5
    labels = victim_logits.argmax(1)
    matched = refine.classification(victim_logits, victim_logits, labels)
    assert matched.abs() < 1e-5
    # same top class everywhere, different ranking of the rest: CE barely sees it, soft labels do
    others = torch.ones_like(victim_logits, dtype=torch.bool).scatter_(1, labels[:, None], False)
    reranked = victim_logits.clone()
    reranked[others] = victim_logits[others].view(6, 9).flip(1).flatten()  # reverse each row's runners-up
    assert torch.equal(reranked.argmax(1), labels)
    assert refine.classification(reranked, victim_logits, labels) > 0.1


def test_black_box_log_probabilities_give_the_same_soft_target_as_logits():
    refine = make_refine(classification_loss="soft", soft_label_temperature=3.0)
    victim_logits, defended = torch.randn(5, 10) * 4, torch.randn(5, 10)
    log_probabilities = victim_logits.softmax(1).log()
    labels = victim_logits.argmax(1)
    assert torch.allclose(
        refine.classification(defended, victim_logits, labels),
        refine.classification(defended, log_probabilities, labels),
        atol=1e-5,
    )


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_transform_net_can_be_built_for_inference(context):
    with context():  # load_defended in an inference script builds T this way
        transform = TransformNet("resnet18", 3, (32, 16, 8))
        assert transform(torch.rand(2, 3, 32, 32)).shape == (2, 3, 32, 32)
    assert all(p.grad is None for p in transform.parameters())
    # the same stages are pruned as when T is built for training
    assert transform.state_dict().keys() == TransformNet("resnet18", 3, (32, 16, 8)).state_dict().keys()


def test_encoder_head_learns_from_the_victim_and_stays_out_of_inference():
    refine = RefineModel(
        Classifier("resnet20", 10),
        TransformNet("resnet18", 3, (32, 16, 8), encoder_head_classes=10),
        LabelPermutation(10),
        encoder_head_weight=1.0,
    )
    head = refine.transform_net.unet.classification_head
    before = [p.clone() for p in head.parameters()]
    losses = refine.loss(torch.rand(8, 3, 32, 32))
    losses["loss"].backward()
    torch.optim.SGD(refine.transform_net.parameters(), lr=0.1).step()
    assert "encoder" in losses and any(not torch.equal(a, b) for a, b in zip(before, head.parameters()))
    weights = refine.transform_net.inference_state_dict()
    assert not any("classification_head" in k for k in weights)
    TransformNet("resnet18", 3, (32, 16, 8)).load_state_dict(weights)  # strict: a head-less T takes them
    with pytest.raises(ValueError, match="encoder_head_classes"):  # a weight without a head
        RefineModel(
            Classifier("resnet20", 10),
            TransformNet("resnet18", 3, (32, 16, 8)),
            LabelPermutation(10),
            encoder_head_weight=1.0,
        )
    with pytest.raises(ValueError, match="encoder_head_classes"):  # a head that would get no gradient
        RefineModel(
            Classifier("resnet20", 10),
            TransformNet("resnet18", 3, (32, 16, 8), encoder_head_classes=10),
            LabelPermutation(10),
        )


def test_identity_transform_and_permutation_give_the_victims_predictions():
    refine = make_refine()
    refine.transform_net = torch.nn.Identity()
    refine.label_permutation = LabelPermutation(10, enabled=False)
    images = torch.rand(16, 3, 32, 32)
    assert torch.equal(refine(images).argmax(1), refine.victim(images).argmax(1))


def test_refine_runs_through_the_cli_and_reports_defended_and_victim_metrics(tmp_path, monkeypatch):
    import sys

    import yaml

    from lightning_defense.attacks import BadNets
    from lightning_defense.cli import main
    from lightning_defense.victims import VictimMetadata, load_victim, save_victim

    torch.manual_seed(0)
    victim_path = tmp_path / "victim.safetensors"
    save_victim(victim_path, Classifier("resnet20", 10), VictimMetadata("resnet20", 10, attack=BadNets().config()))
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "REFINE",
            "init_args": {
                "victim": str(victim_path),
                "encoder_depth": 3,
                "decoder_channels": [16, 8, 4],
                "classification_loss": "soft",
                "encoder_head_weight": 0.5,  # the export must leave the training-only head out
            },
        },
        "data": {
            "class_path": "DefenseDataModule",
            "init_args": {
                "source": {
                    "class_path": "SyntheticDataModule",
                    "init_args": {"train_per_class": 8, "test_per_class": 4, "reserved_fraction": 0.25},
                },
                "aux_data": {"class_path": "ReservedData"},
                "victim": str(victim_path),
                "batch_size": 8,
            },
        },
        "trainer": {
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "callbacks": [{"class_path": "TransformGrid", "init_args": {"num_images": 4}}],
            "logger": {"class_path": "CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": "r"}},
        },
    }
    (tmp_path / "refine.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning"])
    main(["fit", "--config", str(tmp_path / "refine.yaml")])
    run = tmp_path / "runs" / "r" / "version_0"
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/ba", "val/asr", "val/victim_ba", "val/victim_asr", "train/contrastive", "train/encoder"} <= set(header)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    original = load_victim(victim_path).state_dict()
    assert all(torch.equal(state[f"model.victim.{k}"], v) for k, v in original.items())
    assert len(state["model.label_permutation.permutation"]) == 10
    assert (run / "transforms" / "epoch_000.png").stat().st_size > 1000

    # the export loads into one module, without Lightning, and predicts as the trained defense
    from lightning_defense.defenses.components import load_defended
    from lightning_defense.defenses.refine.lightning_model import REFINE

    trained = REFINE.load_from_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=True).eval()
    deployed = load_defended(run / "defended.safetensors")
    images = torch.rand(4, 3, 32, 32)
    assert torch.allclose(deployed(images), trained(images), atol=1e-5)
    other = tmp_path / "other.safetensors"
    save_victim(other, Classifier("resnet20", 10), VictimMetadata("resnet20", 10))
    with pytest.raises(ValueError, match="SHA-256 differs"):
        load_defended(run / "defended.safetensors", victim_path=other)

    # ... and exports as one program for any batch size (issue 7: T, F and M as one module)
    from lightning_defense.defenses.components import export_program

    program = torch.export.load(export_program(deployed, tmp_path / "defended.pt2")).module()
    images = torch.rand(5, 3, 32, 32)
    assert torch.allclose(program(images), trained(images), atol=1e-5)


def test_black_box_mode_distils_a_surrogate_then_trains_t_against_it(tmp_path):
    from lightning import Callback, Trainer

    from lightning_defense.attacks import BadNets
    from lightning_defense.data import DefenseDataModule, SeenData, SyntheticDataModule
    from lightning_defense.defenses.refine import BlackBoxREFINE
    from lightning_defense.victims import VictimMetadata, save_victim

    torch.manual_seed(0)
    victim_path = tmp_path / "victim.safetensors"
    save_victim(victim_path, Classifier("resnet20", 10), VictimMetadata("resnet20", 10, attack=BadNets().config()))
    module = BlackBoxREFINE(
        str(victim_path), distill_epochs=1, encoder_depth=3, decoder_channels=(16, 8, 4), surrogate_arch="resnet20"
    )
    snapshots = []

    class Snapshot(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots.append(
                {
                    "surrogate": [p.clone() for p in pl_module.surrogate.parameters()],
                    "t": [p.clone() for p in pl_module.model.transform_net.parameters()],
                }
            )

    start_t = [p.clone() for p in module.model.transform_net.parameters()]
    start_surrogate = [p.clone() for p in module.surrogate.parameters()]
    data = DefenseDataModule(
        SyntheticDataModule(train_per_class=4, test_per_class=2, reserved_fraction=0.0), SeenData(), batch_size=8
    )
    data.attack = BadNets()
    trainer = Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[Snapshot()],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    first, second = snapshots
    assert not same(first["surrogate"], start_surrogate) and same(first["t"], start_t)  # distillation
    assert same(second["surrogate"], first["surrogate"]) and not same(second["t"], first["t"])  # T's phase
    assert "val/ba" in trainer.callback_metrics and "val/victim_ba" in trainer.callback_metrics
    # the line printed at the end of fit: the victim's numbers before the defended model's
    ba = 100 * float(trainer.callback_metrics["val/ba"])
    victim_ba = 100 * float(trainer.callback_metrics["val/victim_ba"])
    assert module.before_after("val").startswith(f"victim BA {victim_ba:.2f}% / ASR ")
    assert f"->  defended BA {ba:.2f}% / ASR " in module.before_after("val")
    assert module.before_after("test") is None  # no test run yet


def test_the_shipped_embedded_default_runs_end_to_end_in_short(tmp_path):
    """configs/refine.yaml as users run it (shipped victim, embedded data), cut to a few steps."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    command = [
        sys.executable,
        "-m",
        "lightning_defense",
        "fit",
        "--config",
        str(repo / "configs" / "refine.yaml"),
        "--trainer.max_epochs",
        "2",  # the config validates every 2 epochs
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
    ]
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert re.search(
        r"victim BA \d+\.\d\d% / ASR \d+\.\d\d% / RA \d+\.\d\d% / ASR-any \d+\.\d\d%  ->  "
        r"defended BA \d+\.\d\d% / ASR \d+\.\d\d% / RA \d+\.\d\d% / ASR-any \d+\.\d\d%",
        output,
    )
    # output is not a terminal, so the CLI adds EpochSummary: a line per epoch, validation on epoch 1 only
    epochs = [line for line in output.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and "train/loss" in epochs[0]
    assert "val/" not in epochs[0] and "val/ba" in epochs[1]
    run = tmp_path / "runs" / "refine" / "version_0"
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/ba", "val/asr", "val/victim_ba", "train/encoder", "train/contrastive"} <= set(header)
    assert (run / "defended.safetensors").is_file() and (run / "transforms" / "epoch_001.png").is_file()


def test_black_box_soft_targets_stay_faithful_for_a_very_confident_victim(tmp_path, monkeypatch):
    from lightning_defense.defenses.refine import BlackBoxREFINE
    from lightning_defense.victims import VictimMetadata, save_victim

    victim_path = tmp_path / "victim.safetensors"
    save_victim(victim_path, Classifier("resnet20", 10), VictimMetadata("resnet20", 10))
    module = BlackBoxREFINE(
        str(victim_path),
        distill_epochs=0,
        encoder_depth=3,
        decoder_channels=(16, 8, 4),
        classification_loss="soft",
        soft_label_temperature=4.0,
        encoder_head_weight=1.0,
    )
    logits = torch.tensor([[60.0] + [0.0] * 9, [0.0] * 9 + [75.0]])  # runners-up near 1e-26 and 1e-33
    monkeypatch.setattr(module, "victim_probabilities", lambda images: logits.softmax(1))
    seen = {}
    loss = module.model.loss

    def recording_loss(images, victim_logits=None, classifier=None, gather=None):
        seen["victim_logits"] = victim_logits
        return loss(images, victim_logits, classifier, gather)

    monkeypatch.setattr(module.model, "loss", recording_loss)
    module.training_step((torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)), 0)
    tempered = (seen["victim_logits"] / 4).softmax(1)
    assert torch.allclose(tempered, (logits / 4).softmax(1), rtol=1e-3, atol=1e-9)


def test_corruptions_reach_t_after_the_augmentation_while_the_victim_labels_the_clean_images():
    from lightning_defense.data.augmentation import RandomPatches

    seen_by_t = []

    class SpyT(TransformNet):
        def forward_with_head(self, images):
            seen_by_t.append(images)
            return super().forward_with_head(images)

    class Halve(torch.nn.Module):
        def forward(self, images):
            return images / 2

    torch.manual_seed(0)
    victim = Classifier("resnet20", 10)
    refine = RefineModel(
        victim,
        SpyT("resnet18", 3, (32, 16, 8)),
        LabelPermutation(10),
        classification_loss="ce",
        augmentation=Halve(),
        corruptions=[RandomPatches(p=1.0, min_size=4, max_size=4)],
    )
    images = torch.rand(8, 3, 32, 32)
    pseudo_labels = []
    classification = refine.classification
    refine.classification = lambda logits, victim_logits, labels: (
        pseudo_labels.append(labels) or classification(logits, victim_logits, labels)
    )
    refine.loss(images)
    assert torch.equal(pseudo_labels[0], victim(images).argmax(1))
    differs = (seen_by_t[0] != images / 2).any(dim=1)  # the augmented images, each with one 4x4 square
    assert (differs.flatten(1).sum(1) == 16).all()
    # REFINE's own arguments take them from a config, and keep modules out of the hyperparameters
    from lightning_defense.data import RandomNoiseBlend

    assert (
        RefineModel(victim, TransformNet("resnet18", 3, (32, 16, 8)), LabelPermutation(10)).corruptions(images)
        is images
    )
    assert isinstance(RandomNoiseBlend(), torch.nn.Module)


def test_labelled_augmentations_come_before_the_victim_labels_and_given_logits_skip_them():
    class Halve(torch.nn.Module):
        calls = 0

        def forward(self, images):
            Halve.calls += 1
            return images / 2

    torch.manual_seed(0)
    victim = Classifier("resnet20", 10)
    refine = RefineModel(
        victim,
        TransformNet("resnet18", 3, (32, 16, 8)),
        LabelPermutation(10),
        classification_loss="soft",
        labelled_augmentations=[Halve()],
    )
    images = torch.rand(8, 3, 32, 32) + 0.5  # the victim answers differently on the halved images
    assert not torch.equal(victim(images).argmax(1), victim(images / 2).argmax(1))
    targets = []
    classification = refine.classification
    refine.classification = lambda logits, victim_logits, labels: (
        targets.append(victim_logits) or classification(logits, victim_logits, labels)
    )
    refine.loss(images)
    assert torch.allclose(targets[0], victim(images / 2).float())
    assert Halve.calls == 1
    refine.loss(images / 2, victim(images / 2))  # given logits: the caller applied them already
    assert Halve.calls == 1


def test_consistency_term_compares_t_on_corrupted_and_clean_images_and_trains_t_only():
    class AddOne(torch.nn.Module):  # a corruption with a known effect
        def forward(self, images):
            return images + 1

    class Scale(torch.nn.Module):  # T(x) = w x, one weight: T(x + 1) - T(x) = w
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, images):
            return self.w * images

        def forward_with_head(self, images):
            return self(images), None

    torch.manual_seed(0)
    victim = Classifier("resnet20", 10)
    refine = RefineModel(
        victim, Scale(), LabelPermutation(10), contrastive_weight=0.0, corruptions=[AddOne()], consistency_weight=2.0
    )
    images = torch.rand(4, 3, 32, 32)
    parts = refine.loss(images)
    assert parts["consistency"].item() == pytest.approx(0.25)  # (w * 1)^2
    assert parts["loss"].item() == pytest.approx(parts["classification"].item() + 2.0 * 0.25)
    parts["loss"].backward()
    assert refine.transform_net.w.grad is not None
    assert all(p.grad is None for p in victim.parameters())
    # the term alone: d/dw of 2 mean((w (x + 1) - c)^2) at c = w x is 4 w mean(x + 1); were the
    # clean T(x) not a target without gradient, it would be 4 w (the x terms cancel)
    refine.transform_net.w.grad = None
    refine.loss(images)["consistency"].mul(2.0).backward()
    assert refine.transform_net.w.grad.item() == pytest.approx(2.0 * (images + 1).mean().item(), rel=1e-4)
    from lightning_defense.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="give corruptions"):
        RefineModel(victim, Scale(), LabelPermutation(10), consistency_weight=1.0)
