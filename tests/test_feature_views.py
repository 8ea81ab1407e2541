"""Feature views (issue 32, part 4): penultimate features read at the last linear layer, their
two-dimensional embedding, the FeatureView callback and `lightning features`."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import yaml
from test_cli import tiny_config
from torch import nn

from lightning_defense.analysis import embed, penultimate_features
from lightning_defense.cli import main
from lightning_defense.errors import ConfigurationError
from lightning_defense.victims import Classifier


@pytest.mark.parametrize("arch", ["resnet20", "torchvision/resnet18"])
def test_the_features_are_the_input_of_the_last_linear_layer(arch):
    torch.manual_seed(0)
    classifier = Classifier(arch, 10).eval()
    images = torch.rand(6, 3, 32, 32)
    features = penultimate_features(classifier, classifier.linear_layer, images, batch_size=4)
    layer = classifier.linear_layer
    assert features.shape == (6, layer.in_features)
    with torch.no_grad():
        assert torch.allclose(features @ layer.weight.T + layer.bias, classifier(images), atol=1e-5)
    as_uint8 = (images * 255).round().to(torch.uint8)  # uint8 images are read as pixels / 255
    expected = penultimate_features(classifier, layer, as_uint8.float() / 255)
    assert torch.allclose(penultimate_features(classifier, layer, as_uint8), expected)


def test_a_layer_the_answer_never_passes_is_refused():
    classifier, other = Classifier("resnet20", 10).eval(), nn.Linear(64, 10)
    with pytest.raises(ConfigurationError, match="last linear layer"):
        penultimate_features(classifier, other, torch.rand(2, 3, 32, 32))


@pytest.mark.parametrize("method", ["tsne", "pca"])
def test_the_embedding_keeps_separate_clusters_apart_and_is_seeded(method):
    generator = torch.Generator().manual_seed(0)
    # two tight clusters far apart in 64 dimensions, as a backdoor's poisoned images against clean ones
    features = torch.cat([torch.randn(30, 64, generator=generator), torch.randn(30, 64, generator=generator) + 20])
    points = embed(features, method, seed=0)
    assert points.shape == (60, 2)
    first, second = points[:30], points[30:]
    gap = np.linalg.norm(first.mean(0) - second.mean(0))
    spread = max(
        np.linalg.norm(first - first.mean(0), axis=1).max(), np.linalg.norm(second - second.mean(0), axis=1).max()
    )
    assert gap > spread  # every point is nearer its own cluster's centre than the centres are to each other
    assert np.allclose(points, embed(features, method, seed=0))
    with pytest.raises(ConfigurationError, match="at least 4"):
        embed(features[:3], method)


def test_lightning_features_draws_the_victim_beside_the_defended_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning"])
    common = ["--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
    main(["features", "--config", "shrinkpad", "--num_images", "20", "--method", "pca", *common])
    figures = list((tmp_path / "runs").rglob("features/*.png"))
    assert [f.name for f in figures] == ["validate_pca.png"]
    with pytest.raises(SystemExit) as exit_info:
        main(["features", "--help"])
    assert exit_info.value.code == 0 and "--num_images" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # the callback's own checks reach the user as one line
        main(["features", "--config", "shrinkpad", "--method", "umap", *common])
    assert exit_info.value.code == 2 and "'tsne' or 'pca'" in capsys.readouterr().err


def test_a_victim_being_trained_gets_its_view_at_the_end_of_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning"])
    config = yaml.safe_load(tiny_config(tmp_path).read_text())
    config["trainer"]["callbacks"] = [{"class_path": "FeatureView", "init_args": {"num_images": 16, "method": "pca"}}]
    path = tmp_path / "with_view.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path), "--trainer.enable_progress_bar", "false"])
    assert (tmp_path / "runs" / "tiny" / "version_0" / "features" / "fit_pca.png").stat().st_size > 0


def test_without_a_poisoned_test_set_the_view_warns_and_draws_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning"])
    config = yaml.safe_load(tiny_config(tmp_path, attack=None).read_text())
    config["trainer"]["callbacks"] = [{"class_path": "FeatureView", "init_args": {"num_images": 16, "method": "pca"}}]
    path = tmp_path / "clean.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.warns(UserWarning, match="FeatureView draws nothing"):
        main(["fit", "--config", str(path), "--trainer.enable_progress_bar", "false"])
    assert not list((tmp_path / "runs").rglob("features"))
