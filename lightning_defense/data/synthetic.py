"""Images the framework makes itself: procedural, class-dependent images (a DataModule that
needs no files at all, and auxiliary data), and synthetic auxiliary data from a class-conditional
generative model fitted on a small labelled set."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_defense.data.auxiliary import AuxiliaryData, PooledData, ReservedData
from lightning_defense.data.datamodules import BackdoorDataModule
from lightning_defense.errors import ConfigurationError, check_image_size
from lightning_defense.victims import Classifier


def procedural_images(
    num_classes: int, per_class: int, image_size: tuple[int, int], generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Each class is a sinusoidal grating with its own orientation, frequency and colour pair;
    every image draws its phase, contrast, a shift of the class's orientation and pixel noise,
    so classes are learnable but not trivially separable."""
    height, width = image_size
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    n = len(labels)
    angle = math.pi * labels / num_classes + 0.15 * torch.randn(n, generator=generator)
    freq = 2 * math.pi * (1.5 + 3.0 * ((labels * 7) % num_classes) / num_classes)
    phase = 2 * math.pi * torch.rand(n, generator=generator)
    rows = torch.linspace(0, 1, height).view(1, height, 1)
    cols = torch.linspace(0, 1, width).view(1, 1, width)
    proj = cols * angle.cos().view(n, 1, 1) + rows * angle.sin().view(n, 1, 1)
    wave = torch.sin(freq.view(n, 1, 1) * proj + phase.view(n, 1, 1))
    palette = torch.rand(num_classes, 2, 3, generator=torch.Generator().manual_seed(12345))
    low, high = palette[labels, 0].view(n, 3, 1, 1), palette[labels, 1].view(n, 3, 1, 1)
    contrast = 0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=generator)
    mix = (0.5 + 0.5 * contrast * wave.unsqueeze(1)).clamp(0, 1)
    images = low + (high - low) * mix + 0.08 * torch.randn(n, 3, height, width, generator=generator)
    return images.clamp(0, 1).mul(255).round().to(torch.uint8), labels


class SyntheticDataModule(BackdoorDataModule):
    """Procedural images (see :func:`procedural_images`), deterministic by ``data_seed``.

    For tests, demos and as a synthetic auxiliary source; nothing is read from disk.
    """

    def __init__(
        self,
        num_classes: int = 10,
        train_per_class: int = 500,
        test_per_class: int = 100,
        image_size: tuple[int, int] = (32, 32),
        data_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ConfigurationError(f"num_classes must be at least 2, got {num_classes}.")
        for name, count in (("train_per_class", train_per_class), ("test_per_class", test_per_class)):
            if count < 1:
                raise ConfigurationError(f"{name} must be at least 1, got {count}.")
        self.num_classes = num_classes
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        self.image_size = check_image_size(image_size)
        self.data_seed = data_seed

    def load_train(self) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(self.data_seed)
        return procedural_images(self.num_classes, self.train_per_class, self.image_size, generator)

    def load_test(self) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(self.data_seed + 1_000_003)
        return procedural_images(self.num_classes, self.test_per_class, self.image_size, generator)


class ProceduralData(PooledData):
    """Auxiliary data that needs no source images at all: :func:`procedural_images`. Its
    gratings are not the victim's classes, so the victim's predictions label them (and
    ``per_class`` counts those; a victim may give some classes none).

    Args:
        count: images generated before the per-class draw.
        data_seed: seeds the generator.
    """

    def __init__(self, count: int = 10_000, data_seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.count = count
        self.data_seed = data_seed

    def pool(self, source: BackdoorDataModule) -> tuple[Tensor, None]:
        generator = torch.Generator().manual_seed(self.data_seed)
        per_kind = -(-self.count // source.num_classes)
        images, _ = procedural_images(source.num_classes, per_kind, source.image_size, generator)
        return images[: self.count], None


class SyntheticData(AuxiliaryData):
    """Synthetic images from a class-conditional generative model that the framework fits itself
    on a small labelled set (default: the reserved split), as a stand-in for a pretrained image
    generator (none can be downloaded here).

    The model is a Gaussian per class, in probabilistic-PCA form (Tipping and Bishop, 1999): the
    class mean, its top ``components`` principal directions with their variances, and isotropic
    noise of the remaining variance; by default every direction the class's images span (a full
    Gaussian over that span, no noise). Samples keep each class's colours and layout but few of
    its shapes: the shipped BadNets victim classifies far fewer of them as their class than the
    reserved images they were fitted on (benchmarks/README.md, the auxiliary-data study). So they
    are in the victim's label space yet clearly off its image distribution, which is the point
    of the synthetic kind. Labels are the class each image was sampled from.

    Args:
        base: the labelled images the model is fitted on; default :class:`ReservedData`.
        per_class: images sampled per class; default as many as ``base`` has of the class.
        components: principal directions per class; ``None``: all (the class's image count
            minus one). Fewer give smoother, less class-like images (32: 11% on the victim above).
        seed: seeds the sampling.
    """

    def __init__(
        self,
        base: AuxiliaryData | None = None,
        per_class: int | None = None,
        components: int | None = None,
        seed: int = 0,
    ) -> None:
        if (components is not None and components < 1) or (per_class is not None and per_class < 1):
            raise ConfigurationError(f"components and per_class must be >= 1, got {components} and {per_class}.")
        self.base = base if base is not None else ReservedData()
        self.per_class = per_class
        self.components = components
        self.seed = seed

    def select(self, source: BackdoorDataModule, victim: Classifier | None = None) -> tuple[Tensor, Tensor]:
        images, labels = self.base.select(source, victim)
        generator = torch.Generator().manual_seed(self.seed)
        out_images, out_labels = [], []
        for cls in range(source.num_classes):
            members = images[labels == cls].flatten(1).double() / 255
            if len(members) < 2:
                raise ConfigurationError(
                    f"SyntheticData needs at least 2 images of class {cls} to fit its model, the base has "
                    f"{len(members)}: use a larger base."
                )
            count = self.per_class or len(members)
            samples = sample_class_gaussian(members, count, self.components, generator)
            out_images.append(samples.view(count, *images.shape[1:]))
            out_labels.append(torch.full((count,), cls, dtype=torch.long))
        synthetic = torch.cat(out_images).clamp(0, 1).mul(255).round().to(torch.uint8)
        return synthetic, torch.cat(out_labels)


def sample_class_gaussian(members: Tensor, count: int, components: int | None, generator: torch.Generator) -> Tensor:
    """``count`` samples of probabilistic PCA fitted on the rows of ``members`` (flattened images)."""
    mean = members.mean(dim=0)
    centered = members - mean
    _, singular, directions = torch.linalg.svd(centered, full_matrices=False)
    variances = singular**2 / (len(members) - 1)
    k = min(components or len(members), len(members) - 1)
    dims = members.shape[1]
    noise_variance = variances[k:].sum() / (dims - k) if dims > k else torch.tensor(0.0, dtype=members.dtype)
    # PPCA's maximum-likelihood loading: directions scaled by the variance above the noise
    loading = directions[:k].T * (variances[:k] - noise_variance).clamp(min=0).sqrt()
    latent = torch.randn(count, k, generator=generator, dtype=members.dtype)
    noise = torch.randn(count, dims, generator=generator, dtype=members.dtype) * noise_variance.sqrt()
    return (mean + latent @ loading.T + noise).float()
