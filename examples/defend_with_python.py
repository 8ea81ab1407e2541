"""Defend a victim from Python, without YAML: the embedded REFINE default (``configs/refine.yaml``)
written as code, then the defended model loaded back for inference.

    python examples/defend_with_python.py            # the whole recipe: minutes on a laptop CPU
    python examples/defend_with_python.py --quick    # two steps, as CI runs it

It runs from any folder: the shipped victim's ``checkpoints/`` path opens the package's copy.
"""

from __future__ import annotations

import argparse

import torch
from lightning import seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch.optim.lr_scheduler import CosineAnnealingLR

from lightning_defense import DefenseTrainer
from lightning_defense.data import DefenseDataModule, EmbeddedCIFAR10DataModule, SeenData
from lightning_defense.defenses import REFINE, load_defended
from lightning_defense.training.callbacks import TransformGrid

VICTIM = "checkpoints/cifar10_resnet20_badnets.safetensors"  # or your own victim file (`lightning wrap`)


class CPURecipeREFINE(REFINE):
    """REFINE with configs/refine.yaml's optimizer: Adam 2e-3 and a cosine decay over the run. The
    module's own recipe is the paper's (SGD, 150 epochs); a LightningModule method replaces it."""

    def configure_optimizers(self):
        optimizer = torch.optim.Adam((p for p in self.parameters() if p.requires_grad), lr=2e-3)
        return {"optimizer": optimizer, "lr_scheduler": CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two training steps and two evaluation batches")
    args = parser.parse_args()
    seed_everything(0)

    # the model and data of configs/refine.yaml: the victim frozen inside, the shipped CIFAR-10 subset as
    # the defender's unlabeled data (REFINE never reads its labels); the data evaluates the same victim
    model = CPURecipeREFINE(
        VICTIM,
        decoder_channels=(128, 64, 32, 16),
        residual=False,
        classification_loss="soft",
        encoder_head_weight=1.0,
        contrastive_weight=1.0,
    )
    data = DefenseDataModule(EmbeddedCIFAR10DataModule(reserved_fraction=0.0), SeenData(), victim=VICTIM)
    short = {"max_steps": 2, "limit_val_batches": 2, "num_sanity_val_steps": 0} if args.quick else {}
    trainer = DefenseTrainer(
        max_epochs=22,
        check_val_every_n_epoch=2,
        callbacks=[TransformGrid()],
        logger=CSVLogger("runs", name="refine_python"),
        enable_progress_bar=not args.quick,
        **short,
    )
    trainer.fit(model, data)  # writes defended.safetensors in the run folder
    # one dict per evaluation loader (clean, poisoned): BA, ASR, RA, ASR-any, the defended model's and the victim's
    metrics = {key: value for loader in trainer.validate(model, data, verbose=False) for key, value in loader.items()}
    print(model.before_after())

    # inference: M(F(T(x))) as one plain torch module, checked against the victim file it defends
    defended = load_defended(f"{trainer.log_dir}/defended.safetensors")
    data.setup("validate")
    clean, poisoned = data.val_dataloader()
    images, labels = next(iter(clean))
    with torch.no_grad():
        agreement = (defended(images).argmax(1) == labels).float().mean().item()
    ba, ra = 100 * metrics["val/ba"], 100 * metrics["val/ra"]
    print(f"BA {ba:.2f}%, RA {ra:.2f}%; the loaded model on the first clean batch: {100 * agreement:.1f}% correct")


if __name__ == "__main__":
    main()
