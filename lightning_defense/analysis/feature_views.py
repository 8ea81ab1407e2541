"""Feature views (the t-SNE figures of the REFINE and GIC papers): the penultimate features of a
model on clean and poisoned test images, embedded in two dimensions with scikit-learn, drawn with
matplotlib. A backdoored victim shows the poisoned images as one cluster of their own apart from
every class; a defense that removed the backdoor puts each poisoned image back among its class.

"Penultimate features" are the input of the classifier's last linear layer, read with a forward
hook, so any architecture works (this project's, torchvision's, timm's) and a defended model's
features are those of the classifier that answers last, on whatever the defense fed it (REFINE:
F's features of T(x)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lightning_defense.errors import ConfigurationError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

EmbeddingMethod = Literal["tsne", "pca"]
ANALYSIS_MISSING = "scikit-learn and matplotlib are needed: `pip install 'lightning-defense[analysis]'` adds them"


@torch.no_grad()
def penultimate_features(
    model: Callable[[Tensor], Tensor], last_linear: nn.Linear, images: Tensor, batch_size: int = 256
) -> Tensor:
    """The input of ``last_linear`` while ``model`` answers each of ``images`` ([0, 1] or uint8,
    NCHW), flattened, float32, on the CPU."""
    captured: list[Tensor] = []
    hook = last_linear.register_forward_pre_hook(lambda _, inputs: captured.append(inputs[0].flatten(1).float().cpu()))
    device = next(last_linear.parameters()).device
    try:
        for batch in images.split(batch_size):
            batch = batch.to(device)
            model(batch.float().div(255) if batch.dtype == torch.uint8 else batch)
    finally:
        hook.remove()
    if len(captured) != len(images.split(batch_size)):
        raise ConfigurationError(
            "The model's answer did not pass through the given last linear layer once per batch: name the "
            "classifier that answers last (its `linear_layer`)."
        )
    return torch.cat(captured)


def embed(features: Tensor, method: EmbeddingMethod = "tsne", seed: int = 0) -> np.ndarray:
    """Two-dimensional coordinates of ``features`` (N x D): t-SNE (PCA start, perplexity 30 or
    less for few points) or PCA, both scikit-learn's, seeded."""
    try:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
    except ImportError as err:
        raise ConfigurationError(f"Feature views need scikit-learn: {ANALYSIS_MISSING}.") from err
    points = features.double().numpy()
    if len(points) < 4:
        raise ConfigurationError(f"An embedding needs at least 4 images, got {len(points)}.")
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(points)
    if method != "tsne":
        raise ConfigurationError(f"method must be 'tsne' or 'pca', got {method!r}.")
    perplexity = min(30.0, (len(points) - 1) / 3)
    return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(points)


@dataclass
class FeatureSet:
    """One panel: the embedded points of clean and of poisoned images, with their true classes."""

    title: str
    clean: np.ndarray
    clean_labels: np.ndarray
    poisoned: np.ndarray
    poisoned_labels: np.ndarray


def feature_figure(panels: Sequence[FeatureSet], class_names: Sequence[str] | None = None) -> Figure:
    """Clean images as dots and poisoned ones as crosses, both coloured by their true class, a panel
    each: a backdoor shows as a cluster of crosses of every colour, a removed one as crosses among
    the dots of their own colour."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ConfigurationError(f"Feature views need matplotlib: {ANALYSIS_MISSING}.") from err
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.4), squeeze=False)
    classes = max(int(max(p.clean_labels.max(), p.poisoned_labels.max(initial=0))) for p in panels)
    colours = plt.get_cmap("tab10" if classes < 10 else "tab20")
    for ax, panel in zip(axes[0], panels, strict=True):
        for label in np.unique(panel.clean_labels):
            points = panel.clean[panel.clean_labels == label]
            name = class_names[label] if class_names is not None else str(label)
            ax.scatter(points[:, 0], points[:, 1], s=4, color=colours(int(label) % colours.N), label=name)
        crosses = [colours(int(label) % colours.N) for label in panel.poisoned_labels]
        ax.scatter(panel.poisoned[:, 0], panel.poisoned[:, 1], s=10, marker="x", c=crosses, linewidths=0.8)
        ax.scatter([], [], s=10, marker="x", color="black", label="poisoned")  # the legend's entry
        ax.set_title(panel.title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    figure.tight_layout()
    return figure
