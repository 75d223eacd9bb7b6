"""The package's layers, checked from every import statement in distalex/ (function-level
imports included): a module imports only from its own folder or from a lower layer
(docs/design.md, "Layers").  A new folder or top-level module must be given a layer here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "distalex"

# Lowest first.  Units on one line share a layer and must not import each other.
LAYERS = [
    ("errors",),
    ("config",),
    ("runtime",),
    ("model", "data"),
    ("parallel",),
    ("telemetry",),
    ("training",),
    ("serving",),  # the trained model in use: evaluate, predict, export (beneath the command lines)
    ("cli", "__init__"),  # the command line and the public API
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}
# Modules that stand lower than their folder: the one guarded opener (runtime/io.py) imports
# nothing of distalex but errors, so config (which reads the --config file through it) may
# import it (test_the_guarded_io_module_stands_just_above_errors keeps it that way).
MODULE_LAYER = {"distalex.runtime.io": LAYER["errors"]}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """``distalex.parallel.mesh`` -> ``parallel``; ``distalex`` itself -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def is_module(dotted: str) -> bool:
    rel = Path(*dotted.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def imported_modules(path: Path, source: str | None = None):
    """(line, module) for every distalex module ``path`` imports, at any depth of the file."""
    tree = ast.parse(source if source is not None else path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "distalex" or alias.name.startswith("distalex."):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if base != "distalex" and not base.startswith("distalex."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from distalex.parallel import mesh` imports the module distalex.parallel.mesh;
                # `from distalex import train` is the public API (the top layer).
                yield node.lineno, sub if is_module(sub) else base


def violations(path: Path, source: str | None = None) -> list[str]:
    here = unit_of(module_name(path))
    assert here in LAYER, f"{path}: its folder/module '{here}' has no layer in tests/unit/test_layering.py"
    out = []
    for line, module in imported_modules(path, source):
        there = unit_of(module)
        assert there in LAYER, f"{path}:{line}: imports {module}, whose unit '{there}' has no layer"
        if there != here and MODULE_LAYER.get(module, LAYER[there]) >= LAYER[here]:
            out.append(
                f"{path.relative_to(PACKAGE.parent)}:{line}: {here} (layer {LAYER[here]}) imports {module} (layer {LAYER[there]})"
            )
    return out


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_lower_layer_imports_a_higher_one():
    found = [v for path in package_files() for v in violations(path)]
    assert not found, "layering broken:\n" + "\n".join(found)


def test_the_guarded_io_module_stands_just_above_errors():
    for module, layer in MODULE_LAYER.items():
        path = PACKAGE.parent / (module.replace(".", "/") + ".py")
        imported = {m for _, m in imported_modules(path)}
        assert all(LAYER[unit_of(m)] <= layer for m in imported), (module, imported)
    assert not violations(PACKAGE / "config.py", "from distalex.runtime.io import read_bytes\n")
    assert violations(PACKAGE / "config.py", "from distalex.runtime.rundir import claim_dir\n")


def test_every_unit_of_the_package_has_a_layer():
    units = {unit_of(module_name(p)) for p in package_files()}
    assert units <= set(LAYER), units - set(LAYER)
    assert {"model", "parallel", "training", "telemetry", "runtime", "data"} <= units


@pytest.mark.parametrize(
    ("file", "source"),
    [
        ("model/alexnet.py", "from distalex.parallel.mesh import Mesh\n"),  # the model learns of processes
        ("parallel/mesh.py", "def f():\n    from distalex.training import trainer\n"),  # function-level
        ("runtime/io.py", "import distalex.telemetry.records\n"),
        ("data/common.py", "from distalex.model import alexnet\n"),  # same layer, another folder
        ("parallel/towers.py", "from distalex import train\n"),  # the public API is the top
        ("model/flops.py", "from ..parallel import comm\n"),  # relative
    ],
)
def test_the_check_sees_an_upward_import(file, source):
    """The scan itself: each of these would break the layers, and is reported."""
    assert violations(PACKAGE / file, source)


def test_the_check_allows_downward_and_same_folder_imports():
    assert not violations(PACKAGE / "training/trainer.py", "from distalex.parallel.placement import Placement\n")
    assert not violations(PACKAGE / "parallel/placement.py", "from distalex.parallel import towers\n")
    assert not violations(PACKAGE / "parallel/placement.py", "from . import towers\n")
