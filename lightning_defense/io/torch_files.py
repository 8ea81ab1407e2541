"""Reading torch files: the one weights-only load path (plain torch; the Trainer's checkpoint
writer is :class:`lightning_defense.training.trainer.AtomicCheckpointIO`)."""

from __future__ import annotations

import hashlib
import pickle
import re
import sys
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from fsspec.core import url_to_fs

from lightning_defense.errors import UntrustedCheckpointError

#: the oldest torch whose ``weights_only`` loader has no published bypass: CVE-2025-32434 was
#: fixed in 2.6, CVE-2026-24747 in 2.10
SAFE_TORCH = (2, 10)


def check_torch_version(version: str | None = None) -> None:
    """Refuse to read torch files with a torch whose weights-only loader can be made to run code."""
    version = torch.__version__ if version is None else version
    match = re.match(r"(\d+)\.(\d+)", str(version))
    if match and (int(match.group(1)), int(match.group(2))) < SAFE_TORCH:
        floor = ".".join(map(str, SAFE_TORCH))
        raise UntrustedCheckpointError(
            f"torch {version} has published ways to run code through a weights-only checkpoint "
            f"(CVE-2025-32434, CVE-2026-24747), so lightning-defense reads no torch file with it. "
            f"Upgrade: pip install 'torch>={floor}' (with its matching torchvision)."
        )


def imported_object(path: object) -> object | None:
    """What a dotted path read from a file names among the modules already imported, or None:
    a path from an untrusted file never imports anything (contract 3)."""
    if not isinstance(path, str):
        return None
    module, _, name = path.rpartition(".")
    # vars(), not getattr: a module's __getattr__ could import
    return vars(sys.modules[module]).get(name) if module in sys.modules else None


def check_checkpoint(checkpoint: Any, path: object) -> None:
    """A Lightning checkpoint to restore: a mapping with a ``state_dict`` of named tensors, all
    finite (weights of a diverged run would evaluate as nonsense that reads like a result)."""
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not (isinstance(state, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())):
        raise UntrustedCheckpointError(
            f"Checkpoint {str(path)!r} has no state_dict of named tensors: it is not a Lightning checkpoint of "
            "lightning-defense. A victim or export .safetensors file goes in model.init_args.victim instead."
        )
    broken = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if broken:
        raise UntrustedCheckpointError(
            f"Checkpoint {str(path)!r} holds non-finite weights ({', '.join(broken[:3])}): the run that wrote it "
            "diverged. Resume from an earlier checkpoint, or start over with a lower learning rate."
        )


def is_url(path: object) -> bool:
    return str(path).startswith(("http://", "https://"))


def load_weights(path: str | Path, map_location: Any = "cpu") -> Any:
    """Read a torch file (``.ckpt``, ``.pt``, ``.pth``; a local path, ``file://`` or another fsspec
    URL) as weights only: tensors and plain containers, never pickled objects (contract 3)."""
    check_torch_version()
    try:
        if is_url(path):
            # cached under a name of the whole URL: .../runA/last.ckpt and .../runB/last.ckpt must not collide
            name = f"{hashlib.sha256(str(path).encode()).hexdigest()[:16]}-{Path(urlparse(str(path)).path).name}"
            return torch.hub.load_state_dict_from_url(
                str(path), map_location=map_location, weights_only=True, file_name=name
            )
        filesystem, location = url_to_fs(str(path))
        with filesystem.open(location, "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UntrustedCheckpointError(
            f"{str(path)!r} holds pickled Python objects and was refused: unpickling them could run "
            "arbitrary code (contract 3). Use a checkpoint written by lightning-defense, a safetensors file, "
            "or a plain state dict (`torch.save(model.state_dict(), path)`); if you trust the file, convert "
            "it yourself outside this tool."
        ) from err
    except FileNotFoundError:
        raise
    except URLError as err:
        raise UntrustedCheckpointError(
            f"{str(path)!r} could not be downloaded ({err.reason}). Check the address and the network, or "
            "download the file and pass its local path."
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise UntrustedCheckpointError(
            f"{str(path)!r} could not be read as a PyTorch checkpoint ({err}). It may be truncated or not a "
            "checkpoint at all; re-copy or re-export it."
        ) from err
