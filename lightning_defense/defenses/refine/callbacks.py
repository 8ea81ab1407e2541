"""Pictures of what REFINE's transformation does (the paper's figure 6)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning import Callback, LightningModule, Trainer  # noqa: E402

from lightning_defense.callbacks import run_folder  # noqa: E402


class TransformGrid(Callback):
    """After each validation, save ``transforms/epoch_NNN.png`` in the run folder: rows are clean
    test images, T(clean), poisoned images, T(poisoned); titles give the victim's prediction on
    the input and the defended model's prediction.

    Args:
        num_images: images per row, evenly spaced through each evaluation set (the same every epoch).
    """

    def __init__(self, num_images: int = 8) -> None:
        self.num_images = num_images

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        folder = run_folder(trainer) / "transforms"  # on every rank: it is a collective under DDP
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        sets = [("clean", datamodule.test_set), ("poisoned", datamodule.poisoned_test_set)]
        rows = []
        for name, dataset in sets:
            if dataset is None:
                continue
            spread = torch.linspace(0, len(dataset) - 1, self.num_images).long()  # sets are sorted by class
            images = dataset.images[spread].float().div(255).to(pl_module.device)
            transformed = pl_module.model.transform_net(images).float()
            victim = pl_module.victim(images).argmax(1)
            defended = pl_module(images).argmax(1)
            rows.append((name, images, [f"F: {int(p)}" for p in victim]))
            rows.append((f"T({name})", transformed, [f"M∘F∘T: {int(p)}" for p in defended]))
        figure, axes = plt.subplots(len(rows), self.num_images, figsize=(1.4 * self.num_images, 1.6 * len(rows)))
        for row, (name, images, titles) in zip(axes, rows):
            for ax, image, title in zip(row, images, titles):
                ax.imshow(image.clamp(0, 1).permute(1, 2, 0).cpu().numpy())
                ax.set_title(title, fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])
            row[0].set_ylabel(name, fontsize=8)
        figure.suptitle(f"epoch {trainer.current_epoch}", fontsize=9)
        folder.mkdir(parents=True, exist_ok=True)
        figure.savefig(folder / f"epoch_{trainer.current_epoch:03d}.png", dpi=100, bbox_inches="tight")
        plt.close(figure)
