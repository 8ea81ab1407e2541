"""Looking inside a victim or a defended model: penultimate features of clean and poisoned images
embedded in two dimensions (:mod:`.feature_views`)."""

from typing import TYPE_CHECKING

from lightning_defense.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_defense.analysis.feature_views import FeatureSet, embed, feature_figure, penultimate_features

__all__ = ["FeatureSet", "embed", "feature_figure", "penultimate_features"]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
