"""The package's layering, checked from the source by an AST scan (nothing is imported).

Layers, bottom up: ``peftfx.errors`` (a leaf) <- ``peftfx.kernels`` <- the compile pipeline
(plan, trace, targets, graph, pass_manager, emit) <- ``peftfx.passes`` <- ``peftfx.api`` <- the
sub-packages around it (io, serve, distributed, inspect, ...). The tests below keep the arrows:
no import cycles, no reaching into another module's ``_private`` names, kernels self-contained, and
only a few function-level imports, each saying why it is not at the top.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"rewriter": "peftfx", "passes": "peftfx.passes", "kernels": "peftfx.kernels"}
# Function-level imports of peftfx modules: each must carry a comment saying why (start-up time,
# an optional dependency, a cycle being broken), and there may only be a handful of them.
MAX_FUNCTION_LEVEL_IMPORTS = 12


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([package, *parts])] = path
    return mods


MODULES = _modules()


class _Import:
    def __init__(self, node: ast.Import | ast.ImportFrom, module: str, function_level: bool) -> None:
        self.node, self.module, self.function_level = node, module, function_level
        self.line = node.lineno

    def targets(self) -> set[str]:
        """peftfx modules this statement loads (``from peftfx.kernels import ops`` -> peftfx.kernels.ops)."""
        if isinstance(self.node, ast.Import):
            return {a.name for a in self.node.names if a.name.startswith("peftfx")}
        found = {self.module}
        found |= {f"{self.module}.{a.name}" for a in self.node.names if f"{self.module}.{a.name}" in MODULES}
        return {m for m in found if m in MODULES}


def _imports(path: Path) -> list[_Import]:
    tree = ast.parse(path.read_text())
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("peftfx"):
                        out.append(_Import(child, alias.name, in_function))
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").startswith("peftfx"):
                out.append(_Import(child, child.module, in_function))
            visit(child, inside)

    visit(tree, False)
    return out


def _all_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_import_cycles_among_peftfx_modules():
    """Function-level imports count too: deferring an import hides a cycle, it does not remove it."""
    graph = {m: set().union(*[i.targets() for i in _imports(p)]) - {m} for m, p in MODULES.items()}
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}  # parent packages
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                dfs(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)


def test_no_module_imports_another_modules_private_names():
    for module, path in MODULES.items():
        for imp in _imports(path):
            if not isinstance(imp.node, ast.ImportFrom) or imp.module == module:
                continue
            private = [a.name for a in imp.node.names if a.name.startswith("_") and not a.name.startswith("__")]
            assert not private, f"{path.relative_to(ROOT)}:{imp.line} imports {private} from {imp.module}"


def test_errors_module_is_a_leaf():
    assert not _imports(MODULES["peftfx.errors"]), "peftfx.errors must import nothing from peftfx"


def test_kernels_import_only_kernels_and_the_errors_leaf():
    for module, path in MODULES.items():
        if not module.startswith("peftfx.kernels"):
            continue
        for imp in _imports(path):
            assert imp.module == "peftfx.errors" or imp.module.startswith("peftfx.kernels"), (
                f"{path.relative_to(ROOT)}:{imp.line} imports {imp.module}: kernels may import only "
                "peftfx.kernels.* and peftfx.errors")


def test_function_level_imports_are_few_and_explained():
    found = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for imp in _imports(path):
            if not imp.function_level:
                continue
            found.append(f"{path.relative_to(ROOT)}:{imp.line}")
            text = " ".join(lines[imp.line - 1: imp.node.end_lineno])
            above = lines[imp.line - 2].strip() if imp.line >= 2 else ""
            assert "#" in text or above.startswith("#"), (
                f"{path.relative_to(ROOT)}:{imp.line}: a function-level import needs a comment saying why")
    assert len(found) <= MAX_FUNCTION_LEVEL_IMPORTS, (
        f"{len(found)} function-level imports of peftfx modules (at most {MAX_FUNCTION_LEVEL_IMPORTS}): {found}")


def test_passes_never_import_api_or_cli():
    for path in sorted((ROOT / "passes").glob("*.py")):
        for name in _all_imports(path):
            assert name not in ("peftfx.api", "peftfx.inspect.cli", "peftfx.serve.multi_adapter"), \
                f"{path.name} imports {name}"


def test_no_bare_kernels_or_passes_imports():
    for folder in ("rewriter", "passes", "kernels", "tests", "bench", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in _all_imports(path):
                top = name.split(".")[0]
                assert top not in ("kernels", "passes", "rewriter"), f"{path} imports {name} bare"


def test_every_subpackage_is_listed_in_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    for module, path in MODULES.items():
        if path.name == "__init__.py":
            assert f'"{module}"' in text, f"{module} is missing from pyproject.toml's packages"


def test_import_peftfx_kernels_stays_light():
    code = "import sys, peftfx.kernels.ops, peftfx.kernels.modules; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_plan_parsing_does_not_load_torch():
    code = "import sys, peftfx.plan; print('torch' in sys.modules)"
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


def test_no_two_public_functions_share_a_name_across_modules():
    """One name, one meaning: ``peftfx.load_model`` is the checkpoint loader and nothing else."""
    owners: dict[str, list[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        exported = None
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                try:
                    exported = set(ast.literal_eval(node.value))
                except ValueError:
                    exported = None
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                if exported is None or node.name in exported:
                    owners.setdefault(node.name, []).append(module)
    # re-exports are imports, not definitions, so they do not show up here
    shared = {name: mods for name, mods in owners.items() if len(mods) > 1 and name not in ALLOWED_SHARED}
    assert not shared, f"public functions defined in several modules: {shared}"


# Same name, same meaning, different layer: documented exceptions.
ALLOWED_SHARED: dict[str, str] = {
    # peftfx.distributed.save_adapters writes the same files as peftfx.save_adapters from an FSDP2 model
    "save_adapters": "the distributed variant gathers shards first, then writes the same files",
    # ops.dequantize is the dispatched op; reference.dequantize is the oracle it is tested against
    "dequantize": "the op and its oracle compute the same deq(W)",
}
