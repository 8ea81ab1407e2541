"""Weights files with string metadata: the one way this package writes and reads safetensors."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from lightning_defense.errors import UntrustedCheckpointError, UserInputError

T = TypeVar("T")


def write_safetensors(path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Path:
    """Write atomically (a crash mid-write leaves any earlier file at ``path`` intact), flushed to
    disk, readable by others as any file the user writes (``0o666`` less the umask), and
    byte-identical for identical tensors and metadata, so a file's SHA-256 can name it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    try:
        with partial.open("wb") as f:
            f.write(_canonical_header(save(contiguous, metadata=dict(metadata))))
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        partial.chmod(0o666 & ~umask)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _canonical_header(raw: bytes) -> bytes:
    """The safetensors bytes with the JSON header's keys sorted: the library writes them in a hash
    map's order, which differs from run to run (the data offsets do not depend on it)."""
    size = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
    return len(header).to_bytes(8, "little") + header + raw[8 + size :]


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


#: the longest list or string a metadata value may hold
METADATA_LENGTH = 1 << 20
#: the deepest nesting of lists and mappings a metadata value may have
METADATA_DEPTH = 16
#: the largest number in the settings of a network built from a file (widths, depths, image
#: sizes): a crafted file must not ask for terabytes before the weights are compared with it
NETWORK_SETTING_LIMIT = 4096


def metadata_json(metadata: Mapping[str, str], key: str, source: str) -> Any:
    """The JSON value of one metadata entry of an untrusted file; missing or malformed is one error."""
    if key not in metadata:
        raise UntrustedCheckpointError(
            f"{source} has no {key!r} in its metadata: it was not written by this version of lightning-defense "
            "or was altered. Re-export it."
        )
    try:
        return json.loads(metadata[key])
    except RecursionError as err:
        raise UntrustedCheckpointError(
            f"{source}: its metadata {key!r} is nested beyond any setting: the file was altered."
        ) from err
    except (json.JSONDecodeError, TypeError) as err:
        raise UntrustedCheckpointError(
            f"{source}: its metadata {key!r} is not valid JSON ({err}); the file is damaged or altered. Re-export it."
        ) from err


def build_from_metadata(cls: Callable[..., T], values: Any, source: str, what: str, limit: float | None = None) -> T:
    """``cls(**values)`` for settings read from an untrusted file: a mapping whose keys are ``cls``'s
    arguments (none missing, none unknown), whose lists and strings stay within
    :data:`METADATA_LENGTH` and whose numbers are finite and, with ``limit``, at most ``limit`` in
    size; anything else, or a value ``cls`` refuses, is one :class:`UntrustedCheckpointError` naming
    the file."""
    if not isinstance(values, Mapping):
        raise UntrustedCheckpointError(f"{source}: its {what} settings are not a mapping ({type(values).__name__}).")
    parameters = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(values) - set(parameters))
        if unknown:
            raise UntrustedCheckpointError(
                f"{source}: its {what} settings name {', '.join(map(repr, unknown[:5]))}, which {cls.__name__} does "
                "not take: the file was written by another version or altered. Re-export it with this version."
            )
    missing = sorted(
        name
        for name, p in parameters.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in values
    )
    if missing:
        raise UntrustedCheckpointError(f"{source}: its {what} settings lack {', '.join(map(repr, missing))}.")
    _check_bounded(values, f"{source}: its {what} settings", limit)
    try:
        return cls(**values)
    except (UserInputError, TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise UntrustedCheckpointError(f"{source}: its {what} settings are not usable ({err}). Re-export it.") from err


def _check_bounded(value: Any, where: str, limit: float | None, depth: int = 0) -> None:
    if isinstance(value, bool) or value is None:
        return
    if depth > METADATA_DEPTH:
        raise UntrustedCheckpointError(
            f"{where} are nested more than {METADATA_DEPTH} levels deep: the file was altered."
        )
    if isinstance(value, int | float):
        if not math.isfinite(value) or (limit is not None and abs(value) > limit):
            raise UntrustedCheckpointError(f"{where} hold {value!r}, beyond any sensible setting: the file is altered.")
    elif isinstance(value, str | list | dict) and len(value) > METADATA_LENGTH:
        raise UntrustedCheckpointError(f"{where} hold a value of {len(value)} entries: the file was altered.")
    if isinstance(value, list):
        for item in value:
            _check_bounded(item, where, limit, depth + 1)
    elif isinstance(value, dict):
        for item in value.values():
            _check_bounded(item, where, limit, depth + 1)
