"""Weights files with string metadata: the one way this package writes and reads safetensors."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lightning_defense.errors import UntrustedCheckpointError


def write_safetensors(path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Path:
    """Write atomically: a crash mid-write leaves any earlier file at ``path`` intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(contiguous, str(partial), metadata=dict(metadata))
    partial.replace(path)
    return path


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a damaged file is one clear error."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise UntrustedCheckpointError(
            f"{str(path)!r} is not a readable safetensors file ({err}); it may be truncated. Re-copy or re-export it."
        ) from err
    return tensors, metadata


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes: how one file references another it was made with, so a
    swapped or altered file is refused on load."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
