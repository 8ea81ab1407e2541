"""Every defense on victims this project did not build (issue 28): a torchvision and a timm
network at 32, 64 and 224 pixels, a few steps each, ending with BA, ASR and RA logged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning import LightningModule, Trainer

from lightning_defense.attacks import BadNets
from lightning_defense.data import Calibrated, DefenseDataModule, ReservedData, SeenData, SyntheticDataModule
from lightning_defense.defenses import BDMAE, REFINE, TMR, BTIDBFPurification, BTIDBFUnlearning, FineTune, ShrinkPad
from lightning_defense.defenses.bdmae.mae import MaskedAutoencoder, default_patch_size, save_mae
from lightning_defense.errors import ConfigurationError
from lightning_defense.victims import Classifier, VictimMetadata, read_victim_metadata, save_victim

SMALL_T = {"encoder_depth": 3, "decoder_channels": [16, 8, 4]}
ONE_ROUND = {"rounds": 1, "mask_epochs": 1, "generator_epochs": 1, "defense_epochs": 1, **SMALL_T}


def bdmae(victim: str) -> BDMAE:
    """BDMAE with an untrained MAE made, as MAETask does, for the victim's size."""
    size = read_victim_metadata(victim).input_size[0]
    mae = MaskedAutoencoder(size, default_patch_size(size), embed_dim=32, depth=1, num_heads=2)
    path = save_mae(Path(victim).with_name("mae.safetensors"), mae)
    return BDMAE(victim, str(path), repeats=1, masks_per_repeat=2, mask_ratio=0.5, refine_steps=1)


def gic() -> Calibrated:
    return Calibrated(ReservedData(), epsilon=0.025, lr=0.025, steps=2, cache=False, device="cpu")


DEFENSES = {  # name: (the defense on a victim file, its auxiliary data, whether it trains)
    "REFINE": (lambda v: REFINE(v, **SMALL_T), SeenData, True),
    "BTI-DBF (U)": (lambda v: BTIDBFUnlearning(v, **ONE_ROUND), ReservedData, True),
    "BTI-DBF (P)": (lambda v: BTIDBFPurification(v, **ONE_ROUND), ReservedData, True),
    "FT": (FineTune, ReservedData, True),
    "FT on GIC-calibrated data": (FineTune, gic, True),
    "T-MR": (TMR, SeenData, True),
    "ShrinkPad": (ShrinkPad, SeenData, False),
    "BDMAE": (bdmae, SeenData, False),
}
TORCHVISION, TIMM = "torchvision/mobilenet_v3_small", "timm/mobilenetv3_small_050"
# each defense on both libraries at 32/64, and at 224 on one of them, in turn (CI time)
CASES = [
    (defense, arch, size)
    for i, defense in enumerate(DEFENSES)
    for arch, size in ((TORCHVISION, 32), (TIMM, 64), ((TORCHVISION, TIMM)[i % 2], 224))
]


def victim_file(tmp_path: Path, arch: str, size: int) -> str:
    torch.manual_seed(0)
    path = tmp_path / "victim.safetensors"
    attack = BadNets(target=1).config()  # its patch scales with the image
    metadata = VictimMetadata(arch, 10, attack=attack, input_size=[size, size])
    save_victim(path, Classifier(arch, 10, image_size=(size, size)), metadata)
    return str(path)


@pytest.mark.parametrize(("defense", "arch", "size"), CASES, ids=[f"{d}-{a}-{s}" for d, a, s in CASES])
def test_every_defense_runs_on_library_victims_at_every_size(defense, arch, size, tmp_path):
    build, aux_data, trains = DEFENSES[defense]
    victim = victim_file(tmp_path, arch, size)
    source = SyntheticDataModule(train_per_class=2, test_per_class=1, image_size=(size, size), reserved_fraction=0.5)
    data = DefenseDataModule(source, aux_data(), victim=victim, batch_size=4)
    model: LightningModule = build(victim)
    trainer = Trainer(
        max_epochs=3 if defense.startswith("BTI-DBF") else 1,  # BTI-DBF: the three phases of one round
        limit_train_batches=1,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    (trainer.fit if trains else trainer.validate)(model, datamodule=data)
    logged = trainer.callback_metrics
    for name in ("ba", "asr", "ra", "victim_ba"):
        assert 0 <= float(logged[f"val/{name}"]) <= 1, sorted(logged)


def test_btidbf_refuses_data_of_another_size_than_its_feature_mask(tmp_path):
    """A victim that records no size gets a mask for 32x32; 64x64 data is one clear error, not a
    shape mismatch deep in the mask step."""
    path = tmp_path / "bare.safetensors"
    save_victim(path, Classifier("resnet20", 10), VictimMetadata("resnet20", 10, attack=BadNets().config()))
    source = SyntheticDataModule(train_per_class=2, test_per_class=1, image_size=(64, 64), reserved_fraction=0.5)
    data = DefenseDataModule(source, ReservedData(), victim=str(path), batch_size=4)
    trainer = Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(ConfigurationError, match="feature mask for 32x32 images.*serves 64x64.*--image_size"):
        trainer.fit(BTIDBFUnlearning(str(path), **ONE_ROUND), datamodule=data)
