"""The package's layout rules: the plain-torch algorithm files load no Lightning, victims never
import defenses, and the lazy package namespaces export what their imports say."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_defense"
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def loaded_lightning(module: str) -> list[str]:
    """The Lightning modules a fresh interpreter holds after importing ``module``."""
    code = f"import sys, {module}; print(*sorted(m for m in sys.modules if m.split('.')[0] in {LIGHTNING!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.split()


PLAIN = [
    module_name(path)
    for path in [*PACKAGE.rglob("torch_model.py"), PACKAGE / "defenses" / "components" / "__init__.py"]
]


@pytest.mark.parametrize("module", PLAIN)
def test_the_plain_torch_algorithm_files_load_no_lightning(module):
    assert loaded_lightning(module) == []


def test_the_lightning_check_would_see_lightning():  # the positive control
    assert "lightning" in loaded_lightning("lightning_defense.defenses.refine.lightning_model")


def package_imports(folder: str, inside_functions: bool = False) -> dict[str, set[str]]:
    """The lightning_defense modules each file under ``folder`` imports (at module level, or only
    those inside functions)."""
    found = {}
    for path in (PACKAGE / folder).rglob("*.py"):
        tree = ast.parse(path.read_text())
        nested = {
            id(sub)
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            for sub in ast.walk(node)
        }
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and (id(node) in nested) == inside_functions:
                single = ast.Module(body=[node], type_ignores=[])
                names |= {m for m in imported_modules_of(single, path) if m.startswith("lightning_defense")}
        found[str(path.relative_to(PACKAGE))] = names
    return found


def imported_modules_of(tree: ast.AST, path: Path) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = module_name(path).rsplit(".", node.level)[0] if node.level else ""
            names.add(f"{base}.{node.module}" if node.level else node.module)
    return names


def test_victims_import_no_defenses_and_only_the_public_names_of_attacks():
    offenders = {
        path: sorted(m for m in modules if m.startswith(("lightning_defense.defenses", "lightning_defense.attacks.")))
        for path, modules in package_imports("victims").items()
    }
    assert {path: modules for path, modules in offenders.items() if modules} == {}


def test_attacks_import_only_the_plain_parts_of_victims_and_hide_no_import_in_a_function():
    plain = {f"lightning_defense.victims.{m}" for m in ("classifier", "victim_file", "architectures", "feature_split")}
    offenders = {
        path: sorted(m for m in modules if m.startswith("lightning_defense.victims") and m not in plain)
        for path, modules in package_imports("attacks").items()
    }
    assert {path: modules for path, modules in offenders.items() if modules} == {}
    for folder in ("attacks", "victims"):  # a function-level import was how a cycle used to hide
        assert {path: m for path, m in package_imports(folder, inside_functions=True).items() if m} == {}


def test_the_boundary_checks_see_an_offending_import():  # the positive control
    path = PACKAGE / "victims" / "classifier.py"
    tree = ast.parse(
        "from lightning_defense.attacks.badnets import BadNets\ndef f():\n    import lightning_defense.defenses"
    )
    assert imported_modules_of(tree, path) == {"lightning_defense.attacks.badnets", "lightning_defense.defenses"}


@pytest.mark.parametrize(
    "package",
    sorted(
        {
            module_name(path.parent / "__init__.py")
            for path in PACKAGE.rglob("__init__.py")
            if "lazy_exports" in path.read_text()
        }
    ),
)
def test_every_lazy_export_is_listed_and_loads(package):
    import importlib

    module = importlib.import_module(package)
    tree = ast.parse(Path(module.__file__).read_text())
    declared = {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for statement in node.body
        if isinstance(statement, ast.ImportFrom)
        for alias in statement.names
    }
    assert declared and set(module.__all__) <= declared | set(vars(module))
    for name in sorted(declared):
        assert getattr(module, name) is not None
    with pytest.raises(AttributeError):
        module.NoSuchName  # noqa: B018


def test_the_earlier_names_still_work_for_a_release_and_say_where_things_went():
    from lightning_defense.defenses import refine
    from lightning_defense.defenses.refine.torch_model import RefineModel
    from lightning_defense.training.callbacks import TransformGrid

    with pytest.warns(FutureWarning, match="RefineModel"):
        assert refine.Refine is RefineModel
    with pytest.warns(FutureWarning, match="lightning_defense.training.callbacks.TransformGrid"):
        assert refine.TransformGrid is TransformGrid


@pytest.mark.parametrize(
    ("old", "new", "init_args"),
    [
        ("VictimTrainer", "VictimTask", {"arch": "resnet20", "lr": 0.05}),
        ("InputAwareVictimTrainer", "InputAwareVictimTask", {"arch": "resnet20", "lr": 0.05}),
        ("MAETrainer", "MAETask", {"lr": 0.05}),
    ],
)
def test_the_earlier_lightning_module_names_build_the_new_classes_with_a_warning(
    old, new, init_args, tmp_path, capsys, monkeypatch
):
    import lightning_defense
    from lightning_defense import defenses

    package = defenses if old == "MAETrainer" else lightning_defense
    old_class, new_class = getattr(package, old), getattr(package, new)
    assert issubclass(old_class, new_class)
    with pytest.warns(FutureWarning, match=f"{old} is now {new}"):
        module = old_class(**init_args)
    assert module.hparams.lr == 0.05
    # a config naming the old class still parses, its arguments those of the new one
    from lightning_defense.cli import main

    (tmp_path / "old.yaml").write_text(yaml.safe_dump({"model": {"class_path": old, "init_args": init_args}}))
    monkeypatch.setattr(sys, "argv", ["lightning"])
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "old.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].endswith(old) and printed["model"]["init_args"]["lr"] == 0.05


def test_the_modules_earlier_paths_import_the_moved_modules_with_a_warning():
    code = (
        "import warnings, sys\n"
        "warnings.simplefilter('error', FutureWarning)\n"
        "try:\n"
        "    import lightning_defense.callbacks\n"
        "except FutureWarning as warning:\n"
        "    print(warning)\n"
        "warnings.simplefilter('ignore', FutureWarning)\n"
        "from lightning_defense.evaluation import BackdoorMetrics\n"
        "import lightning_defense.metrics, lightning_defense.callbacks, lightning_defense.training.callbacks as new\n"
        "print(BackdoorMetrics is lightning_defense.metrics.BackdoorMetrics, lightning_defense.callbacks is new)\n"
        "print(new.__spec__.name)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    warning, identities, spec = done.stdout.strip().splitlines()
    assert warning.startswith("lightning_defense.callbacks is now lightning_defense.training.callbacks")
    assert identities == "True True"
    assert spec == "lightning_defense.training.callbacks"  # the module keeps its own spec
