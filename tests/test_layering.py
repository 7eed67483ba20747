"""Imports flow one way: kernels <- passes <- rewriter/api. An AST scan keeps the arrows."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_kernels_import_nothing_from_passes_or_rewriter():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for name in _imports(path):
            if name.startswith("peftfx") and not name.startswith("peftfx.kernels"):
                assert name == "peftfx.errors", f"{path.name} imports {name}"


def test_passes_never_import_api_or_cli():
    for path in sorted((ROOT / "passes").glob("*.py")):
        for name in _imports(path):
            assert name not in ("peftfx.api", "peftfx.inspect.cli", "peftfx.serve.multi_adapter"), f"{path.name} imports {name}"


def test_no_bare_kernels_or_passes_imports():
    for folder in ("rewriter", "passes", "kernels", "tests", "bench", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in _imports(path):
                top = name.split(".")[0]
                assert top not in ("kernels", "passes", "rewriter"), f"{path} imports {name} bare"


def test_import_peftfx_kernels_stays_light():
    code = "import sys, peftfx.kernels.ops, peftfx.kernels.modules; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_functions_are_not_shadowed_by_submodules():
    """Importing peftfx.<x> sets the package attribute x to the module: no public name may be one."""
    import importlib
    import pkgutil

    import peftfx

    for info in pkgutil.iter_modules(peftfx.__path__):
        importlib.import_module(f"peftfx.{info.name}")
    for name in peftfx.__all__:
        value = getattr(peftfx, name)
        assert not isinstance(value, type(peftfx)), f"peftfx.{name} is a module, not the public object"
