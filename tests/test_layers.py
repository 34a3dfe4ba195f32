"""The package's layers keep to their imports (datagen/<layer>/__init__.py says what each is).

data/ and tools/ import no torch, Prefect or Ray, at module level or inside a function, so
`datagen filter`, `inspect` and `validate` start fast and run on a machine without a GPU
stack; core/ and data/ import nothing from the layers above them.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(importlib.import_module("datagen").__file__).parent
HEAVY = ("torch", "prefect", "ray", "diffusers", "transformers", "open_clip")
HEAVY_FREE = ("data", "tools")  # core/ imports torch and prefect lazily, where a stage needs them
# layer -> the datagen layers its modules may import from
ALLOWED = {
    "core": ("core",),
    "data": ("core", "data"),
    # audit checks a build against its plan: it needs the build's settings and the planner
    "tools": ("core", "data", "tools", "build.settings", "build.plan"),
}


def modules(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


def imported_names(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement in `path` names, wherever the statement is."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "datagen":  # from datagen import x
                found += [(node.lineno, f"datagen.{alias.name}") for alias in node.names]
    return found


def violations(layer: str) -> list[str]:
    allowed = ALLOWED[layer]
    problems = []
    for path in modules(layer):
        where = path.relative_to(PACKAGE.parent)
        for line, name in imported_names(path):
            top = name.split(".")[0]
            if top in HEAVY and layer in HEAVY_FREE:
                problems.append(f"{where}:{line} imports {name}")
            inner = name.removeprefix("datagen.")
            within = any(inner == a or inner.startswith(a + ".") for a in allowed)
            if top == "datagen" and name not in ("datagen", "datagen.__version__") and not within:
                problems.append(f"{where}:{line} imports {name} (above its layer)")
    return sorted(problems, key=lambda p: int(p.split(":")[1].split()[0]))


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_stay_within_bounds(layer):
    assert modules(layer), f"no modules under datagen/{layer}"
    assert violations(layer) == []


def test_the_scan_sees_a_forbidden_import(tmp_path, monkeypatch):
    # the same scan on a copy of data/ with one lazy torch import and one upward import
    fake = tmp_path / "datagen"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "bad.py").write_text(
        "def f():\n    import torch.nn\n\nfrom datagen.build.settings import BuildConfig\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert violations("data") == [
        "datagen/data/bad.py:2 imports torch.nn",
        "datagen/data/bad.py:4 imports datagen.build.settings (above its layer)",
    ]


def test_importing_every_data_and_tools_module_loads_no_heavy_library():
    names = [
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for layer in ("data", "tools")
        for path in modules(layer)
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
