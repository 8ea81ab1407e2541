"""BDMAE: mask likely trigger tokens of each test image and restore them with a masked autoencoder."""

from typing import TYPE_CHECKING

from lightning_defense.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_defense.defenses.bdmae.lightning_model import BDMAE, MAETask
    from lightning_defense.defenses.bdmae.lightning_model import MAETrainer as MAETrainer  # its earlier name
    from lightning_defense.defenses.bdmae.mae import MaskedAutoencoder, load_mae, save_mae
    from lightning_defense.defenses.bdmae.torch_model import BDMAEDefense, HardLabelOracle, PurifiedBatch

__all__ = [
    "BDMAE",
    "BDMAEDefense",
    "HardLabelOracle",
    "MAETask",
    "MaskedAutoencoder",
    "PurifiedBatch",
    "load_mae",
    "save_mae",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
