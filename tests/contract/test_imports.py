"""The shape of the library's imports, checked from the source (``ast``, function-level imports included) and in a
fresh interpreter: the library (``geolora/`` without ``geolora/app/``) never imports the application, its modules
import each other without a cycle, no module imports another module's ``_private`` names (except from
``geolora._compat``, the one module for PEFT/transformers/accelerate internals), only ``geolora._compat`` imports
private modules or names of those packages, and the library never prints."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "geolora"
# ``python -m geolora`` is the command line's entry point (it runs geolora.app.cli); the library never imports it
ENTRY_POINTS = {"geolora.__main__"}
COMPAT = "geolora._compat"
INTERNALS_PACKAGES = ("peft", "transformers", "accelerate")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _library_files() -> dict[str, Path]:
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if name == "geolora.app" or name.startswith("geolora.app.") or name in ENTRY_POINTS:
            continue
        files[name] = path
    return files


LIBRARY = _library_files()


def _is_module(name: str) -> bool:
    path = REPO_ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """Every import statement of ``path`` (at any depth: module level, functions, ``if`` blocks) as
    ``(absolute module, imported names, line)``; ``import a.b`` gives ``("a.b", [], line)``."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                drop = node.level - 1 if is_package else node.level
                base = base[: len(base) - drop] if drop else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [alias.name for alias in node.names], node.lineno))
    return found


def _geolora_edges(module: str, path: Path) -> list[tuple[str, int]]:
    """The geolora modules that ``module`` imports, with the line of each import."""
    edges = []
    for target, names, line in _imports(module, path):
        if target != "geolora" and not target.startswith("geolora."):
            continue
        submodules = [f"{target}.{n}" for n in names if _is_module(f"{target}.{n}")]
        # ``from . import integrator`` imports the submodule; ``from .config import X`` the module itself
        edges.extend((sub, line) for sub in submodules)
        if not submodules or len(submodules) < len(names):
            edges.append((target, line))
    return edges


def test_the_library_is_found():
    assert {"geolora", "geolora._compat", "geolora.io", "geolora.layer", "geolora.model", "geolora.optim"} <= set(
        LIBRARY
    ), sorted(LIBRARY)


def test_no_library_module_imports_the_application_in_a_fresh_interpreter():
    code = (
        "import importlib, json, sys\n"
        f"for name in {sorted(LIBRARY)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'geolora.app' or m.startswith('geolora.app.'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing the library loaded the application modules {loaded}"


def test_no_library_module_imports_the_application_in_its_source():
    offenders = [
        f"{module} (line {line}) imports {target}"
        for module, path in LIBRARY.items()
        for target, line in _geolora_edges(module, path)
        if target == "geolora.app" or target.startswith("geolora.app.")
    ]
    assert not offenders, offenders


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_library_has_no_import_cycle_function_level_imports_included():
    graph = {
        module: {target for target, _ in _geolora_edges(module, path) if target in LIBRARY and target != module}
        for module, path in LIBRARY.items()
    }
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_library_module_imports_private_names_of_another_geolora_module():
    offenders = []
    for module, path in LIBRARY.items():
        for target, names, line in _imports(module, path):
            if target != "geolora" and not target.startswith("geolora."):
                continue
            for name in names or [target.rsplit(".", 1)[-1]]:
                full = f"{target}.{name}" if names else target
                if full == COMPAT or full.startswith(COMPAT + ".") or target == COMPAT:
                    continue  # the designated internals module (its functions are public names)
                private_module = any(part.startswith("_") and part != "__init__" for part in target.split("."))
                if name.startswith("_") or private_module:
                    offenders.append(f"{module} (line {line}): from {target} import {name}")
    assert not offenders, offenders


def test_only_compat_imports_private_modules_or_names_of_peft_transformers_accelerate():
    offenders = []
    for module, path in LIBRARY.items():
        if module == COMPAT:
            continue
        for target, names, line in _imports(module, path):
            if target.split(".")[0] not in INTERNALS_PACKAGES:
                continue
            private = [p for p in target.split(".") if p.startswith("_")] + [n for n in names if n.startswith("_")]
            if private:
                offenders.append(f"{module} (line {line}): {target} {names}")
    assert not offenders, offenders


@pytest.mark.parametrize("module", sorted(LIBRARY))
def test_the_library_never_prints(module):
    tree = ast.parse(LIBRARY[module].read_text())
    prints = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    ]
    assert not prints, f"{module} calls print() on lines {prints}; the library logs (logging) or warns instead"
