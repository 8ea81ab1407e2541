"""BDMAE: mask likely trigger tokens of each test image and restore them with a masked autoencoder."""

from lightning_defense.defenses.bdmae.lightning_model import BDMAE, MAETrainer
from lightning_defense.defenses.bdmae.mae import MaskedAutoencoder, load_mae, save_mae
from lightning_defense.defenses.bdmae.torch_model import BDMAEDefense, HardLabelOracle, Purification

__all__ = [
    "BDMAE",
    "BDMAEDefense",
    "HardLabelOracle",
    "MAETrainer",
    "MaskedAutoencoder",
    "Purification",
    "load_mae",
    "save_mae",
]
