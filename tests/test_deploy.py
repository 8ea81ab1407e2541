"""Cheap defended inference (issue 33, part 2): M folded into the victim's last linear layer and
BatchNorm into convolutions give the same function with fewer operations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_defense.defenses.components import (
    BorderPerturbation,
    LabelPermutation,
    ReprogrammedClassifier,
    TransformNet,
    export_program,
    fold_for_inference,
)
from lightning_defense.victims import Classifier


def trained_looking(module: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, as after training (fresh ones would
    make the fold an identity and the test blind)."""
    generator = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
    return module


@pytest.mark.parametrize("arch", ["resnet20", "torchvision/resnet18"])
def test_the_folded_model_computes_the_same_function_with_no_batchnorm_and_no_permutation(arch):
    torch.manual_seed(0)
    victim = trained_looking(Classifier(arch, 10))
    transform = trained_looking(TransformNet(encoder_depth=3, decoder_channels=(16, 8, 4)))
    model = ReprogrammedClassifier(victim, transform, LabelPermutation(10, 3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_for_inference(model)
    images = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(folded(images), model(images), atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert torch.equal(folded.label_permutation.permutation, torch.arange(10))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    # positive control: without the permuted head, the identity M would answer other classes
    unpermuted = fold_for_inference(ReprogrammedClassifier(victim, transform, LabelPermutation(10, enabled=False)))
    with torch.no_grad():
        assert not torch.allclose(unpermuted(images), model(images), atol=1e-4)


def test_a_border_transform_folds_the_victim_alone_and_the_program_is_the_folded_model(tmp_path):
    torch.manual_seed(0)
    victim = trained_looking(Classifier("resnet20", 10))
    model = ReprogrammedClassifier(victim, BorderPerturbation(32, 4), LabelPermutation(10, 1)).eval()
    program = torch.export.load(export_program(model, tmp_path / "defended.pt2")).module()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(program(images), model(images), atol=1e-4)
    names = {node.target for node in program.graph.nodes if node.op == "call_function"}
    assert not any("batch_norm" in str(name) for name in names)  # the exported program is the folded one
