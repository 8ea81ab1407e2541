"""Earlier names kept working for one release, each with a warning that says where it went."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from importlib.machinery import ModuleSpec
from types import ModuleType


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``old`` is now ``new`` and that the old name goes in the next release."""
    warnings.warn(f"{old} is now {new}; the old name goes in the next release.", FutureWarning, stacklevel=stacklevel)


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of a module's earlier path give the module at its new path, with a warning: code
    and configs that name ``lightning_defense.callbacks`` keep working for one release."""

    def __init__(self, moved: dict[str, str]) -> None:
        self.moved = moved

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname in self.moved else None

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        warn_renamed(spec.name, self.moved[spec.name], stacklevel=4)
        module = importlib.import_module(self.moved[spec.name])
        spec.loader_state = module.__spec__  # the import system now gives the module this spec
        return module

    def exec_module(self, module: ModuleType) -> None:
        # already executed at its new path: give it back its own spec
        module.__spec__ = module.__spec__.loader_state


def keep_moved_modules(moved: dict[str, str]) -> None:
    """Install a :class:`MovedModules` finder for ``moved`` (earlier path -> new path), once."""
    if not any(isinstance(finder, MovedModules) and finder.moved == moved for finder in sys.meta_path):
        sys.meta_path.append(MovedModules(moved))
