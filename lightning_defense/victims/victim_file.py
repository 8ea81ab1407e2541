"""Victim files: weights plus the facts a defense needs, never pickled objects (contract 3).

A victim file is a safetensors file whose metadata holds the architecture, class count,
normalization, and the attack and data settings that trained it, so a defense can rebuild the
poisoned test set from the file alone. :func:`load_victim` also reads a Lightning checkpoint of
:class:`~lightning_defense.victims.VictimTask` and a bare state dict from a third party, both
through ``torch.load(weights_only=True)``, which refuses anything that would run code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from lightning_defense.errors import (
    ConfigurationError,
    InputNotFoundError,
    UntrustedCheckpointError,
    UserInputError,
    check_image_size,
)
from lightning_defense.io.safetensors_files import (
    build_from_metadata,
    metadata_json,
    read_safetensors,
    write_safetensors,
)
from lightning_defense.io.shipped import resolve
from lightning_defense.io.torch_files import imported_object, load_weights
from lightning_defense.victims.classifier import CIFAR10_MEAN, CIFAR10_STD, Classifier

FORMAT = "lightning-defense-victim/1"
#: more classes than any data set a victim is trained on (ImageNet-21k has 21,841)
MAX_CLASSES = 100_000


@dataclass
class VictimMetadata:
    arch: str
    num_classes: int
    mean: Sequence[float] = CIFAR10_MEAN
    std: Sequence[float] = CIFAR10_STD
    # ``{"class_path": ..., "init_args": {...}}`` of the attack and of the data that trained it
    attack: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: where the features end, for networks without a split of their own (Classifier's ``feature_node``)
    feature_node: str | None = None
    #: ``[height, width]`` the victim takes, for a victim without the record of its data (a wrapped one)
    input_size: list[int] | None = None
    #: the network takes BGR images (see :class:`~lightning_defense.victims.Classifier`)
    bgr: bool = False

    def __post_init__(self) -> None:
        # also a schema for metadata read from files (build_from_metadata turns these into one error)
        if not isinstance(self.arch, str) or not self.arch:
            raise ConfigurationError(f"arch must be an architecture name, not {self.arch!r}.")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise ConfigurationError(f"num_classes must be an integer, not {self.num_classes!r}.")
        if not 2 <= self.num_classes <= MAX_CLASSES:
            raise ConfigurationError(f"num_classes must be in [2, {MAX_CLASSES:,}], not {self.num_classes:,}.")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if not (
                isinstance(values, Sequence)
                and 1 <= len(values) <= 4
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
            ):
                raise ConfigurationError(f"{name} must be 1 to 4 numbers, one a channel, not {values!r}.")
        if any(v <= 0 for v in self.std):
            raise ConfigurationError(f"std must be positive, not {list(self.std)!r}.")
        for name in ("attack", "data"):
            block = getattr(self, name)
            if block is not None and not (isinstance(block, dict) and isinstance(block.get("class_path"), str)):
                raise ConfigurationError(f"{name} must be null or a class_path/init_args mapping, not {block!r}.")
        if self.data is not None and "image_size" in self.data and _size(self.data["image_size"]) is None:
            raise ConfigurationError(f"data.image_size must be two positive integers, not {self.data['image_size']!r}.")
        if self.input_size is not None and _size(self.input_size) is None:
            raise ConfigurationError(f"input_size must be two positive integers, not {self.input_size!r}.")
        if not isinstance(self.extra, dict):
            raise ConfigurationError(f"extra must be a mapping, not {self.extra!r}.")
        if not isinstance(self.bgr, bool):
            raise ConfigurationError(f"bgr must be true or false, not {self.bgr!r}.")
        if self.feature_node is not None and not (isinstance(self.feature_node, str) and self.feature_node):
            raise ConfigurationError(f"feature_node must be null or a graph node name, not {self.feature_node!r}.")

    def image_size(self) -> tuple[int, int] | None:
        """The size of the images the victim takes: given when it was wrapped, recorded with its
        data, or for files that predate the record, the fixed size of the recorded DataModule
        class (looked up among imported classes only). None when unknown."""
        data = self.data or {}
        size = self.input_size or data.get("image_size")
        if size is None:
            size = getattr(imported_object(data.get("class_path")), "image_size", None)
        return _size(size)

    def to_strings(self) -> dict[str, str]:
        return {"format": FORMAT, **{k: json.dumps(v) for k, v in asdict(self).items()}}

    @classmethod
    def from_strings(cls, strings: Mapping[str, str], source: str = "the victim file") -> VictimMetadata:
        """Metadata read from an untrusted file, checked against this schema (one error otherwise)."""
        values = {key: metadata_json(strings, key, source) for key in strings if key != "format"}
        return build_from_metadata(cls, values, source, "victim metadata")


def _size(size: object) -> tuple[int, int] | None:
    """``(height, width)`` when ``size`` is a valid image size (:func:`check_image_size`), else None."""
    try:
        return check_image_size(size)
    except ConfigurationError:
        return None


def save_victim(path: str | Path, classifier: Classifier, metadata: VictimMetadata) -> Path:
    """Write ``classifier``'s weights and ``metadata`` as one safetensors file, atomically."""
    return write_safetensors(path, classifier.state_dict(), metadata.to_strings())


def save_repaired_victim(path: str | Path, repaired: Classifier, original: str | Path, repaired_by: str) -> Path:
    """Write a defense's repaired copy of the victim ``original`` as a victim file with the
    original's metadata (its attack, so the repaired copy can be evaluated like any victim) and
    a note of who repaired it."""
    metadata = read_victim_metadata(original) or VictimMetadata(
        repaired.arch,
        repaired.num_classes,
        repaired.mean.flatten().tolist(),
        repaired.std.flatten().tolist(),
        feature_node=repaired.feature_node,
        bgr=repaired.bgr,
    )
    metadata.extra = {**metadata.extra, "repaired_by": repaired_by, "repaired_from": str(original)}
    return save_victim(path, repaired, metadata)


def check_same_victim(stored: object, configured: object, checkpoint: object) -> None:
    """Refuse to resume a checkpoint that defends another victim than the configured one."""
    if stored is None or configured is None:
        return
    stored, configured = str(stored), str(configured)
    if stored != configured and Path(stored).resolve() != Path(configured).resolve():
        raise UntrustedCheckpointError(
            f"Checkpoint {str(checkpoint)!r} defends victim {stored[:300]!r}, but the config names {configured!r}. "
            "Resume with the run's own victim, or start a new run (no --ckpt_path) for another."
        )


def _missing(path: Path) -> InputNotFoundError:
    return InputNotFoundError(
        f"Victim checkpoint {str(path)!r} does not exist. Train one with "
        "`lightning fit --config configs/victims/cifar10_badnets.yaml` (it writes victim.safetensors "
        "in the run folder), or use the shipped one in checkpoints/."
    )


def _read(path: str | Path) -> tuple[dict[str, torch.Tensor], VictimMetadata | None]:
    """Weights and (when the file carries them) metadata, from any supported format."""
    path = resolve(path)  # a shipped victim's checkpoints/ path works from any folder
    if not path.is_file():
        raise _missing(path)
    if path.suffix == ".safetensors":
        weights, strings = read_safetensors(path)
        metadata = VictimMetadata.from_strings(strings, repr(str(path))) if strings.get("format") == FORMAT else None
        return weights, metadata
    obj = load_weights(path)
    if isinstance(obj, Mapping) and "state_dict" in obj:  # a Lightning checkpoint of VictimTask
        prefix = "classifier."
        state = obj["state_dict"] if is_state_dict(obj["state_dict"]) else _no_state_dict(path)
        weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        stored = obj.get("victim_metadata")
        metadata = build_from_metadata(VictimMetadata, stored, repr(str(path)), "victim metadata") if stored else None
        return weights, metadata
    if is_state_dict(obj):
        return dict(obj), None
    _no_state_dict(path)


def is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _no_state_dict(path: Path) -> NoReturn:
    raise UntrustedCheckpointError(
        f"{str(path)!r} holds no state dict (names to tensors); expected a safetensors file, a Lightning "
        "checkpoint of VictimTask, or `torch.save(model.state_dict(), path)`."
    )


def read_victim_metadata(path: str | Path) -> VictimMetadata | None:
    return _read(path)[1]


def load_victim(
    path: str | Path,
    arch: str | None = None,
    num_classes: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    image_size: Sequence[int] | None = None,
    feature_node: str | None = None,
) -> Classifier:
    """Load a victim frozen (contract 2) and from weights only (contract 3).

    ``arch`` and ``num_classes`` are needed for a bare third-party state dict (``image_size`` for
    networks built for one size, ``feature_node`` to split one elsewhere than the default); for
    our own files they are checked against what the file says, so a victim never meets data of
    another class count unnoticed. :func:`wrap_state_dict` turns a bare state dict into a victim
    file once, so its facts need not be repeated.
    """
    weights, metadata = _read(path)
    if metadata is None:
        if arch is None or num_classes is None:
            raise ConfigurationError(
                f"{str(path)!r} is a bare state dict without metadata: pass `arch` and `num_classes` "
                "(and `mean`/`std` if the network was trained on other normalization), or wrap it into a "
                "victim file once with `lightning-defense wrap` (see `lightning-defense wrap --help`)."
            )
        size = list(image_size) if image_size is not None else None
        metadata = VictimMetadata(
            arch, num_classes, mean or CIFAR10_MEAN, std or CIFAR10_STD, feature_node=feature_node, input_size=size
        )
    if num_classes is not None and num_classes != metadata.num_classes:
        raise ConfigurationError(
            f"Class-count mismatch: victim {str(path)!r} has {metadata.num_classes} classes but the "
            f"data has {num_classes}. Use a victim trained on this data set, or the matching data."
        )
    if arch is not None and arch != metadata.arch:
        raise ConfigurationError(f"Victim {str(path)!r} is a {metadata.arch!r}, not a {arch!r}.")
    try:
        classifier = Classifier(
            metadata.arch,
            metadata.num_classes,
            metadata.mean,
            metadata.std,
            metadata.image_size(),
            feature_node or metadata.feature_node,
            metadata.bgr,
        )
    except UserInputError as err:
        raise ConfigurationError(f"Victim {str(path)!r}: {err}") from err
    if "mean" not in weights:  # bare state dicts carry only the network
        weights = {f"network.{k}": v for k, v in weights.items()}
        weights |= {"mean": classifier.mean, "std": classifier.std}
    try:
        classifier.load_state_dict(weights)
    except RuntimeError as err:
        raise ConfigurationError(
            f"The weights in {str(path)!r} do not fit a {metadata.arch!r} with {metadata.num_classes} classes: {err}"
        ) from err
    # a victim with NaN weights or a zero std answers nonsense that would read as a defense's result
    broken = [name for name, t in classifier.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if broken or not (classifier.std > 0).all():
        what = f"non-finite weights ({', '.join(broken[:3])})" if broken else "a std that is not positive"
        raise UntrustedCheckpointError(
            f"Victim {str(path)!r} holds {what}: it cannot classify. Use an intact victim file."
        )
    classifier.metadata = metadata
    return classifier.freeze()
