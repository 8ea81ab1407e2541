"""Files: the one weights-only way to read a torch file, safetensors files with checked metadata,
run folders, and the configs and victims shipped with the package (docs: the trust model)."""

from typing import TYPE_CHECKING

from lightning_defense.lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_defense.io.run_folder import run_folder
    from lightning_defense.io.safetensors_files import read_safetensors, sha256, write_safetensors
    from lightning_defense.io.torch_files import load_weights

__all__ = ["load_weights", "read_safetensors", "run_folder", "sha256", "write_safetensors"]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
