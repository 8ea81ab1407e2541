"""Lazy package namespaces: a package's ``__init__`` names its exports in an
``if TYPE_CHECKING:`` block of imports (what readers, type checkers and the docs see), and
:func:`lazy_exports` imports each on first use, so importing a plain-torch module of the package
does not load Lightning."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path


def lazy_exports(package: str, init_file: str) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` from the imports under ``if TYPE_CHECKING:``
    in its ``__init__`` file (absolute or relative, ``from x import name [as other]``)."""
    exports: dict[str, tuple[str, str]] = {}
    for node in ast.parse(Path(init_file).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for statement in node.body:
                if isinstance(statement, ast.ImportFrom):
                    module = importlib.util.resolve_name("." * statement.level + (statement.module or ""), package)
                    for alias in statement.names:
                        exports[alias.asname or alias.name] = (module, alias.name)

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attribute = exports[name]
        # `from <package> import submodule` names a submodule, not an attribute of the package
        value = importlib.import_module(f"{module}.{attribute}") if module == package else None
        if value is None:
            value = getattr(importlib.import_module(module), attribute)
        setattr(sys.modules[package], name, value)  # the next access finds it without us
        return value

    def __dir__() -> list[str]:
        return sorted({*exports, *vars(sys.modules[package])})

    return __getattr__, __dir__


def import_all(*packages: str) -> None:
    """Import every export of each package now: configs name classes by short names (``REFINE``,
    ``BadNets``), which resolve only among the subclasses already imported."""
    for package in packages:
        module = importlib.import_module(package)
        for name in dir(module):
            getattr(module, name)
