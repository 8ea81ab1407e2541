"""BDMAE: the MAE's restoration, the scores and their refinement, the hard-label contract, the MAE
files, and both modules through the CLI."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RunsCode
from torch import Tensor, nn

from lightning_defense.defenses.bdmae import BDMAE, BDMAEDefense, HardLabelOracle, MaskedAutoencoder, load_mae, save_mae
from lightning_defense.defenses.bdmae.mae import IMAGENET_MEAN, IMAGENET_STD, paste_masked
from lightning_defense.defenses.bdmae.torch_model import (
    adaptive_token_masks,
    covering_token_masks,
    fuse_restorations,
    refine_scores,
)
from lightning_defense.errors import ConfigurationError, UntrustedCheckpointError

REPO = Path(__file__).resolve().parents[1]
VICTIM = REPO / "checkpoints" / "cifar10_resnet20_badnets.safetensors"
TRIGGER_TOKEN = 2 * 8 + 5  # row 2, column 5 of the 8x8 grid: pixels 8-11 x 20-23


def tiny_mae(**overrides) -> MaskedAutoencoder:
    settings = {"embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1}
    return MaskedAutoencoder(**{**settings, **overrides}).eval()


class GrayFill(nn.Module):
    """A stand-in restorer: masked tokens become flat gray."""

    grid_size = (8, 8)
    num_tokens = 64

    def restore(self, images: Tensor, token_mask: Tensor) -> Tensor:
        return paste_masked(images, torch.full_like(images, 0.5), token_mask, self.grid_size)


class PatchDetector(nn.Module):
    """A toy backdoored victim: class 1 exactly when the white patch fills the trigger token."""

    def forward(self, images: Tensor) -> Tensor:
        present = (images[:, :, 8:12, 20:24] == 1).flatten(1).all(dim=1)
        return torch.stack([~present, present], dim=1).float()


def plant_trigger(images: Tensor) -> Tensor:
    poisoned = images.clone()
    poisoned[:, :, 8:12, 20:24] = 1
    return poisoned


class ArgmaxOnlyLogits(Tensor):
    """Logits that answer argmax and nothing else: any other read of them raises."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (Tensor.argmax, torch.argmax):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise AssertionError(f"the victim's logits were read through {getattr(func, '__name__', func)}")


class HardLabelOnlyVictim(nn.Module):
    """Wraps a victim so that its logits can only be reduced to labels, without gradients."""

    def __init__(self, victim: nn.Module) -> None:
        super().__init__()
        self.victim = victim
        self.calls = 0

    def forward(self, images: Tensor) -> Tensor:
        assert not torch.is_grad_enabled(), "the victim was queried with gradients on"
        self.calls += 1
        return self.victim(images).as_subclass(ArgmaxOnlyLogits)


def test_restoration_leaves_unmasked_pixels_exactly_unchanged_and_batches_like_single_images():
    torch.manual_seed(0)
    mae, images = tiny_mae(), torch.rand(6, 3, 32, 32)
    # rows mask 6 to 58 tokens: the encoder pads the shorter rows of visible tokens
    token_mask = torch.rand(6, 64) < torch.linspace(0.1, 0.9, 6).unsqueeze(1)
    with torch.no_grad():
        restored = mae.restore(images, token_mask)
        one_by_one = torch.cat([mae.restore(images[i : i + 1], token_mask[i : i + 1]) for i in range(6)])
    pixels = token_mask.view(6, 1, 8, 1, 8, 1).expand(6, 3, 8, 4, 8, 4).reshape(6, 3, 32, 32)
    assert torch.equal(restored[~pixels], images[~pixels])
    assert (restored[pixels] != images[pixels]).float().mean() > 0.99  # the masked tokens were replaced
    assert torch.allclose(restored, one_by_one, atol=1e-5)


def test_fusion_averages_the_restorations_over_the_masks_that_cover_each_pixel():
    images = torch.zeros(1, 1, 1, 3)
    restorations = torch.tensor([[[[[2.0, 4.0, 9.0]]]], [[[[6.0, 8.0, 9.0]]]]])  # (K=2, N=1, C, H, W)
    masks = torch.tensor([[[[[True, True, False]]]], [[[[True, False, False]]]]])
    fused = fuse_restorations(images, restorations, masks)
    assert torch.equal(fused, torch.tensor([[[[4.0, 4.0, 0.0]]]]))  # both, one, none (the image's own)


def test_random_masks_cover_every_token_in_every_repeat():
    torch.manual_seed(0)
    masks = covering_token_masks(batch=16, repeats=5, masks_per_repeat=5, num_tokens=64, mask_ratio=0.75, device=None)
    assert masks.shape == (16, 5, 5, 64)
    assert masks.any(dim=2).all()  # every token of every image at least once per repeat
    assert (masks.sum(-1) <= 48).all() and (masks.sum(-1) == 48).float().mean() > 0.5
    assert not torch.equal(masks[0], masks[1])  # drawn per image


def test_refinement_keeps_the_mean_score_and_raises_the_planted_trigger():
    torch.manual_seed(0)
    images = plant_trigger(torch.rand(8, 3, 32, 32) * 0.9)
    oracle = HardLabelOracle(PatchDetector())
    labels = oracle(images)
    assert (labels == 1).all()
    scores = torch.rand(8, 64)
    scores[:, TRIGGER_TOKEN] = 0.95  # among the top 21 candidates (an odd count: the top 20 take part)
    refined = refine_scores(scores, images, labels, torch.full((8,), 21), GrayFill(), oracle, steps=10, step_size=0.05)
    assert torch.allclose(refined.mean(dim=1), scores.mean(dim=1), atol=1e-6)
    # restoring a set that holds the trigger flips the label (the set gains), one that does not
    # leaves it (the rest, trigger included, gains): the trigger gains beta_0 at every step
    assert torch.allclose(refined[:, TRIGGER_TOKEN], torch.full((8,), 0.95 + 10 * 0.05))
    others = torch.ones(64, dtype=torch.bool)
    others[TRIGGER_TOKEN] = False
    assert ((refined - scores)[:, others] <= 0.05 * 10 + 1e-6).all()
    untouched = refine_scores(scores, images, labels, torch.ones(8, dtype=torch.long), GrayFill(), oracle)
    assert torch.equal(untouched, scores)  # fewer than two candidates: nothing to split


def test_adaptive_masks_are_nested_thresholds_raised_only_to_cap_the_restored_share():
    scores = torch.zeros(3, 64)
    scores[0] = torch.linspace(0, 1, 64)  # 38 tokens >= 0.4: the thresholds must rise
    scores[1, :10] = torch.tensor([0.65, 0.6, 0.57, 0.52, 0.5, 0.47, 0.42, 0.4, 0.3, 0.1])
    scores[2] = 0.9  # every token high: raised until none is left
    masks = adaptive_token_masks(scores, (0.6, 0.55, 0.5, 0.45, 0.4), max_share=0.25)
    assert masks.shape == (5, 3, 64)
    assert all((masks[k] <= masks[k + 1]).all() for k in range(4))  # each mask holds the previous
    assert masks[-1, 0].sum() == 15  # raised just below a quarter of the tokens (16)
    assert torch.equal(masks[:, 1].sum(-1), torch.tensor([2, 3, 5, 6, 8]))  # small enough: the thresholds as given
    assert not masks[:, 2].any()


def test_bdmae_restores_the_planted_trigger_and_the_label_comes_back():
    torch.manual_seed(0)
    clean = torch.rand(6, 3, 32, 32) * 0.9
    poisoned = plant_trigger(clean)
    defense = BDMAEDefense(PatchDetector(), GrayFill())
    assert (defense.oracle(poisoned) == 1).all()
    purification = defense.purify(poisoned)
    assert purification.token_mask[:, TRIGGER_TOKEN].all()
    assert (purification.scores.argmax(dim=1) == TRIGGER_TOKEN).all()
    assert (defense(poisoned) == 0).all() and (defense(clean) == 0).all()
    torch.manual_seed(1)
    first = defense.purify(poisoned)
    torch.manual_seed(1)
    assert torch.equal(defense.purify(poisoned).images, first.images)  # a seeded run repeats


def test_the_defense_reads_only_hard_labels_of_the_victim():
    torch.manual_seed(0)
    victim = HardLabelOnlyVictim(PatchDetector())
    with pytest.raises(AssertionError, match="logits were read"), torch.no_grad():  # the guard itself works
        victim(torch.rand(1, 3, 32, 32)).softmax(dim=1)
    defense = BDMAEDefense(victim, tiny_mae())
    images = plant_trigger(torch.rand(4, 3, 32, 32) * 0.9).requires_grad_(True)
    labels = defense(images)  # would raise if anything but argmax touched the logits
    assert labels.dtype == torch.long and not labels.requires_grad
    assert victim.calls > 3 and defense.oracle.queries <= 4 * 52  # the seed's 52 queries per image, at most


def test_mae_files_round_trip_and_official_layouts_load(tmp_path):
    torch.manual_seed(0)
    mae = tiny_mae(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    images, token_mask = torch.rand(3, 3, 32, 32), torch.rand(3, 64) < 0.5
    loaded = load_mae(save_mae(tmp_path / "mae.safetensors", mae))
    assert loaded.config == mae.config and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded.restore(images, token_mask), mae.restore(images, token_mask))

    # facebookresearch/mae's layout (224 px, 16 px patches, no normalization buffers), on 32x32 images
    official = MaskedAutoencoder(224, 16, 128, 1, 2, 64, 1, 1, mean=IMAGENET_MEAN, std=IMAGENET_STD).eval()
    state = {k: v for k, v in official.state_dict().items() if k not in ("mean", "std")}
    torch.save({"model": state}, tmp_path / "mae_visualize.pth")
    loaded = load_mae(tmp_path / "mae_visualize.pth")
    assert loaded.config == official.config
    grid_mask = torch.rand(3, 196) < 0.3
    with torch.no_grad():
        restored = loaded.restore(images, grid_mask)
        assert torch.equal(restored, official.restore(images, grid_mask))
    cells = torch.nn.functional.interpolate(grid_mask.view(3, 1, 14, 14).float(), size=(32, 32)) > 0.5
    assert torch.equal(restored[~cells.expand_as(images)], images[~cells.expand_as(images)])

    encoder_only = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}
    torch.save(encoder_only, tmp_path / "timm_mae_encoder.pth")
    with pytest.raises(ConfigurationError, match="without the MAE decoder"):
        load_mae(tmp_path / "timm_mae_encoder.pth")
    marker = tmp_path / "ran"
    torch.save({"model": RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UntrustedCheckpointError):
        load_mae(tmp_path / "evil.pth")
    assert not marker.exists()


def test_the_encoder_has_timms_vision_transformer_layout():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    mae = tiny_mae()
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0, global_pool=""
    ).eval()
    encoder = {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask_token", "mean", "std"))}
    vit.load_state_dict(encoder, strict=True)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ours, _ = mae.encode(images, torch.zeros(2, 64, dtype=torch.bool))
        assert torch.allclose(ours, vit.forward_features((images - mae.mean) / mae.std), atol=1e-5)


def test_mae_training_lowers_the_masked_reconstruction_error():
    torch.manual_seed(0)
    mae = tiny_mae().train()
    images = torch.rand(8, 3, 32, 32).cumsum(dim=-1) / 32  # smooth rows: predictable from neighbours
    optimizer = torch.optim.AdamW(mae.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        token_mask = mae.random_token_mask(8, 0.75)
        loss = mae.loss(images, mae(images, token_mask), token_mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_bdmae_settings_and_training_are_refused_with_the_fix(tmp_path):
    mae_path = save_mae(tmp_path / "mae.safetensors", tiny_mae())
    with pytest.raises(ConfigurationError, match="mask_ratio=1.5"):
        BDMAE(str(VICTIM), str(mae_path), mask_ratio=1.5)
    with pytest.raises(ConfigurationError, match="cannot mask every token"):
        BDMAE(str(VICTIM), str(mae_path), masks_per_repeat=1)
    module = BDMAE(str(VICTIM), str(mae_path))
    with pytest.raises(ConfigurationError, match="lightning validate"):
        module.training_step((torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)), 0)
    logits = module(torch.rand(3, 3, 32, 32))
    assert logits.shape == (3, 10) and torch.equal(logits.sum(dim=1), torch.ones(3))  # one-hot


def test_the_mae_trainer_builds_its_mae_for_the_data_and_bdmae_warns_on_another_size(tmp_path):
    from lightning import Trainer

    from lightning_defense.data import DefenseDataModule, SeenData, SyntheticDataModule
    from lightning_defense.defenses import MAETask

    def data(size: int) -> DefenseDataModule:
        source = SyntheticDataModule(train_per_class=1, test_per_class=1, image_size=(size, size), reserved_fraction=0)
        return DefenseDataModule(source, SeenData(), batch_size=4)

    def fit(model: MAETask, size: int) -> None:
        options = {"logger": False, "enable_progress_bar": False, "enable_checkpointing": False}
        trainer = Trainer(
            max_epochs=1, limit_train_batches=1, limit_val_batches=1, default_root_dir=tmp_path, **options
        )
        trainer.fit(model, datamodule=data(size))

    small = {"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 1}
    model = MAETask(**small)
    fit(model, 64)
    assert model.mae.image_size == 64 and model.mae.grid_size == (8, 8)  # 8-pixel tokens at 64
    with pytest.raises(ConfigurationError, match="works on 32x32 images but .* serves 64x64"):
        fit(MAETask(image_size=32, **small), 64)
    # a 32x32 MAE on 64x64 data runs (resized) but says so
    mae_path = save_mae(tmp_path / "mae32.safetensors", tiny_mae())
    bdmae = BDMAE(str(VICTIM), str(mae_path))
    with pytest.warns(UserWarning, match="works on 32x32 images and the data are 64x64"):
        Trainer(logger=False, enable_progress_bar=False, limit_val_batches=0).validate(bdmae, datamodule=data(64))


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lightning_defense", *arguments, "--trainer.enable_progress_bar", "false"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_mae_training_then_bdmae_validation_through_the_shipped_configs(tmp_path):
    runs = str(tmp_path / "runs")
    run_cli(
        "fit", "--config", str(REPO / "configs" / "bdmae" / "mae.yaml"),
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
        "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1",
        "--data.init_args.batch_size", "16", "--trainer.logger.init_args.save_dir", runs,
    )  # fmt: skip
    mae_run = tmp_path / "runs" / "mae" / "version_0"
    rows = list(csv.DictReader((mae_run / "metrics.csv").open()))
    assert any(row["train/loss"] for row in rows)
    validation = next(row for row in rows if row["val/psnr"])
    mse, psnr = float(validation["val/reconstruction_mse"]), float(validation["val/psnr"])
    assert 0 < mse < 1 and math.isclose(psnr, -10 * math.log10(mse), rel_tol=1e-4)
    mae = load_mae(mae_run / "mae.safetensors")
    assert mae.grid_size == (8, 8) and mae.config["embed_dim"] == 192  # the config's MAE

    done = run_cli(
        "validate", "--config", str(REPO / "configs" / "bdmae.yaml"),
        "--model.init_args.mae", str(mae_run / "mae.safetensors"),
        "--trainer.limit_val_batches", "1", "--data.init_args.batch_size", "4",
        "--trainer.logger.init_args.save_dir", runs,
    )  # fmt: skip
    run = tmp_path / "runs" / "bdmae" / "version_0"
    row = next(csv.DictReader((run / "metrics.csv").open()))
    assert {"val/ba", "val/asr", "val/victim_ba", "val/victim_asr"} <= set(row)
    assert all(0 <= float(row[k]) <= 1 for k in ("val/ba", "val/asr", "val/victim_ba"))
    assert float(row["val/victim_asr"]) == 1.0  # the shipped BadNets victim on its 4 poisoned images
    assert (run / "transforms" / "epoch_000.png").is_file()
    assert "val/ba" in done.stdout
