"""Turn a classifier's weights from anywhere into a victim file: the weights plus the facts a
defense needs (architecture, classes, input size, normalization, and optionally the attack to
evaluate), so that every defense's config names the file alone.

    lightning-defense wrap attack_result.pt --key model --arch backdoorbench_preactresnet18 \\
        --num_classes 10 --mean '[0.4914, 0.4822, 0.4465]' --std '[0.247, 0.243, 0.261]' \\
        --attack '{"class_path": "BadNets", "init_args": {"target": 0}}' --out victim.safetensors

The source is read as weights only (contract 3): a safetensors file, or a torch file of tensors
and plain containers (``torch.save(model.state_dict(), path)``; BackdoorBench's
``attack_result.pt`` with ``--key model``; a Lightning checkpoint with ``--key state_dict``).
A ``module.`` prefix (``nn.DataParallel``) is removed. The weights must fit ``arch`` exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from lightning_defense.attacks import Attack
from lightning_defense.errors import ConfigurationError, InputNotFoundError, UntrustedCheckpointError
from lightning_defense.io.safetensors_files import read_safetensors
from lightning_defense.io.torch_files import load_weights
from lightning_defense.victims.architectures import allow_network, is_class_path
from lightning_defense.victims.classifier import Classifier
from lightning_defense.victims.victim_file import VictimMetadata, is_state_dict, save_victim


def read_state_dict(source: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """The network's weights in ``source`` (``key``: the entry of a checkpoint that holds them)."""
    if not source.is_file():
        raise InputNotFoundError(f"{str(source)!r} does not exist.")
    obj = read_safetensors(source)[0] if source.suffix == ".safetensors" else load_weights(source)
    if key is not None:
        if not (isinstance(obj, Mapping) and key in obj):
            found = ", ".join(map(repr, list(obj)[:10])) if isinstance(obj, Mapping) else type(obj).__name__
            raise ConfigurationError(f"{str(source)!r} has no entry {key!r} (it holds {found}).")
        obj = obj[key]
    if not (obj and is_state_dict(obj)):
        entries = ", ".join(map(repr, list(obj)[:10])) if isinstance(obj, Mapping) else type(obj).__name__
        raise UntrustedCheckpointError(
            f"{str(source)!r}{f' [{key!r}]' if key else ''} is not a state dict (names to tensors); it holds "
            f"{entries}. Name the entry with the weights with --key (BackdoorBench: model)."
        )
    prefix = "module."
    if all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return dict(obj)


def wrap(
    source: Path,
    *,
    out: Path,
    arch: str,
    num_classes: int,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    image_size: tuple[int, int] | None = None,
    feature_node: str | None = None,
    attack: Attack | None = None,
    key: str | None = None,
    bgr: bool = False,
    overwrite: bool = False,
) -> VictimMetadata:
    """Write ``source``'s weights as the victim file ``out`` and print what it holds.

    Args:
        source: the weights (safetensors, or a torch file read as weights only).
        out: the victim file to write (``.safetensors``).
        arch: the network (see ``lightning_defense.victims.architectures``): this project's names,
            ``backdoorbench_preactresnet18``, ``backdoorbox_resnet18``, ``torchvision/<builder>``,
            ``timm/<name>``, or the import path of your own nn.Module class (``mypackage.nets.MyNet``,
            built as ``MyNet(num_classes=K)``; configs that load the file allow it in ``victim_networks``).
        num_classes: classes of the network's output.
        mean: per-channel mean the network's training subtracted from [0, 1] pixels (none: 0).
        std: per-channel std it divided by (none: 1).
        image_size: ``[height, width]`` of the images it takes (needed for ViTs; recorded for all).
        feature_node: where BTI-DBF splits features from head, if not the default (a torchvision
            graph node or module name, e.g. ``layer3``).
        attack: the attack the network carries, to measure ASR/RA (``class_path``/``init_args``
            of a lightning-defense attack with its trigger settings); none: a clean or unknown one.
        key: the entry of a checkpoint that holds the state dict (BackdoorBench: ``model``).
        bgr: the network was trained on BGR images (OpenCV; the official REFINE code's victims);
            ``mean``/``std`` are then in BGR order.
        overwrite: replace an existing ``out``.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigurationError(f"--out must end in .safetensors, got {str(out)!r}.")
    if out.exists() and not overwrite:
        raise ConfigurationError(f"{str(out)!r} exists; pass --overwrite true to replace it, or another --out.")
    weights = read_state_dict(Path(source), key)
    size = list(image_size) if image_size is not None else None
    metadata = VictimMetadata(
        arch,
        num_classes,
        list(mean),
        list(std),
        attack=attack.config() if attack is not None else None,
        extra={"wrapped_from": Path(source).name},
        feature_node=feature_node,
        input_size=size,
        bgr=bgr,
    )
    if is_class_path(arch):  # the caller's own nn.Module class: their choice, not a file's
        allow_network(arch)
    classifier = Classifier(arch, num_classes, metadata.mean, metadata.std, metadata.image_size(), feature_node, bgr)
    try:
        classifier.network.load_state_dict(weights)
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])[:600]
        raise ConfigurationError(f"The weights in {str(source)!r} do not fit {arch!r}: {detail}") from err
    if image_size is not None:  # the network must take that size: a wrong one fails here, not in a defense
        with torch.no_grad():
            logits = classifier.eval()(torch.zeros(1, len(metadata.mean), *image_size))
        if logits.shape != (1, num_classes):
            raise ConfigurationError(f"{arch!r} answers {tuple(logits.shape)} for one image, not (1, {num_classes}).")
    save_victim(out, classifier, metadata)
    parameters = sum(p.numel() for p in classifier.network.parameters())
    print(
        f"Wrote {out}: {arch}, {num_classes} classes, {parameters:,} parameters, input "
        f"{'x'.join(map(str, image_size)) if image_size else 'any size'}{', BGR' if bgr else ''}, mean {list(mean)}, "
        f"std {list(std)}, "
        f"attack {metadata.attack['class_path'] if metadata.attack else 'none'}."
    )
    return metadata


def main(args: list[str] | None = None) -> None:
    """``lightning-defense wrap``: :func:`wrap` from the command line, ``source`` positional and
    every other argument an option (``--out``, ``--arch``...) on every jsonargparse the package
    allows (older ones turned required keyword-only arguments into positional ones)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lightning wrap", description=wrap.__doc__, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="the options below as a YAML file")
    parser.add_argument("source", type=Path, help="the weights (safetensors, or a torch file read as weights only)")
    parser.add_function_arguments(wrap, as_group=False, as_positional=False, skip={"source"})
    config = parser.instantiate_classes(parser.parse_args(args)).as_dict()
    config.pop("config", None)
    wrap(**config)
