"""A reprogrammed victim M(F(T(x))) (REFINE, T-MR, BTI-DBF (P)) as one weights-only file, and
its loader for inference.

    from lightning_defense.defenses import load_defended
    model = load_defended("runs/refine/version_0/defended.safetensors")
    predictions = model(images).argmax(1)      # images: float NCHW in [0, 1]

The file holds T's weights, the permutation M and T's settings; the victim is referenced by
path and SHA-256 (its weights are the third party's, not ours to copy), and checked on load.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch.fx.experimental.optimization import fuse

from lightning_defense.defenses.components.label_permutation import LabelPermutation
from lightning_defense.defenses.components.reprogramming import ReprogrammedClassifier
from lightning_defense.defenses.components.transform_net import BorderPerturbation, TransformNet
from lightning_defense.errors import ConfigurationError, InputNotFoundError
from lightning_defense.io.safetensors_files import (
    NETWORK_SETTING_LIMIT,
    build_from_metadata,
    metadata_json,
    read_safetensors,
    sha256,
    write_safetensors,
)
from lightning_defense.io.shipped import resolve
from lightning_defense.victims import load_victim

FORMAT = "lightning-defense-refine/1"  # REFINE's first: kept, so that every export stays readable
TRANSFORMS = {"TransformNet": TransformNet, "BorderPerturbation": BorderPerturbation}


def save_defended(
    path: str | Path, model: ReprogrammedClassifier, victim_path: str | Path, transform_config: dict
) -> Path:
    """Write T and M of ``model`` with a reference to the victim file, atomically."""
    tensors = {f"transform_net.{k}": v for k, v in model.transform_net.inference_state_dict().items()}
    tensors["label_permutation.permutation"] = model.label_permutation.permutation
    metadata = {
        "format": FORMAT,
        "transform_class": type(model.transform_net).__name__,
        "victim_path": str(victim_path),
        "victim_sha256": sha256(resolve(victim_path)),
        "transform_net": json.dumps(transform_config),
    }
    return write_safetensors(path, tensors, metadata)


def load_defended(path: str | Path, victim_path: str | Path | None = None) -> ReprogrammedClassifier:
    """Load M(F(T(x))) for inference (eval mode). ``victim_path`` overrides the stored reference,
    e.g. after moving files; the victim must still match the stored SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"Defended model {str(path)!r} does not exist.")
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise ConfigurationError(
            f"{str(path)!r} is not an export of a defended model (format {metadata.get('format')!r})."
        )
    victim_path = resolve(victim_path or metadata["victim_path"])
    if not victim_path.is_file():
        raise InputNotFoundError(
            f"The victim {str(victim_path)!r} referenced by {str(path)!r} does not exist: pass victim_path=."
        )
    if sha256(victim_path) != metadata["victim_sha256"]:
        raise ConfigurationError(
            f"{str(victim_path)!r} is not the victim this defense was trained for (SHA-256 differs)."
        )
    victim = load_victim(victim_path)
    permutation = tensors.pop("label_permutation.permutation")
    # the class comes from a fixed list, never imported by name: the file is untrusted input
    transform_class = TRANSFORMS.get(metadata.get("transform_class", "TransformNet"))
    if transform_class is None:
        raise ConfigurationError(
            f"{str(path)!r} holds a transformation {metadata['transform_class']!r} that this version does not know "
            f"({', '.join(TRANSFORMS)})."
        )
    settings = metadata_json(metadata, "transform_net", repr(str(path)))
    transform_net = build_from_metadata(
        transform_class, settings, repr(str(path)), "transformation", NETWORK_SETTING_LIMIT
    )
    transform_net.load_state_dict({k.removeprefix("transform_net."): v for k, v in tensors.items()})
    label_permutation = LabelPermutation(len(permutation))
    label_permutation.permutation.copy_(permutation)
    return ReprogrammedClassifier(victim, transform_net, label_permutation).eval()


@torch.no_grad()
def fold_for_inference(model: ReprogrammedClassifier) -> ReprogrammedClassifier:
    """A copy of M(F(T(x))) that computes the same function with less work, for inference only:
    M is folded into F's last linear layer (its rows permuted, M then the identity) and every
    BatchNorm of T and F into the convolution before it (``torch.fx``'s conv-BN fusion, eval
    statistics). Both folds are exact up to float rounding; the model itself is left untouched."""
    folded = copy.deepcopy(model).eval()
    head = folded.victim.linear_layer
    permutation = folded.label_permutation.permutation.to(head.weight.device)
    head.weight.copy_(head.weight[permutation])
    head.bias.copy_(head.bias[permutation])
    folded.label_permutation.permutation.copy_(torch.arange(len(permutation)))
    folded.victim.replace_network(fuse(folded.victim.network))
    if isinstance(folded.transform_net, TransformNet):
        folded.transform_net.unet = fuse(folded.transform_net.unet)
    return folded


def export_program(
    model: ReprogrammedClassifier, path: str | Path, image_size: tuple[int, int] = (32, 32), fold: bool = True
) -> Path:
    """M(F(T(x))) as one ``torch.export`` program (``.pt2``, any batch size) for runtimes without
    this package: ``torch.export.load(path).module()(images)``; with ``fold`` (default) the
    program is :func:`fold_for_inference`'s. Unlike the safetensors export it embeds the victim's
    weights, so it is yours to keep, not to share as the victim's owner's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = fold_for_inference(model) if fold else model.eval()
    example = torch.rand(2, 3, *image_size, device=next(model.parameters()).device)
    program = torch.export.export(model, (example,), dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}})
    torch.export.save(program, path)
    return path
