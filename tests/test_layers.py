"""The packages' import order: each module imports from its own layer or lower ones only, and no
module-level import cycle exists (read from the source with `ast`, nothing is imported)."""

from __future__ import annotations

import ast
import collections
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("dendrite_jax", "kernels_pallas")

# Lowest first. A module is in the layer of its longest package prefix listed here, so the
# package `dendrite_jax` itself, and whatever is not listed below it, is a front end.
LAYERS = (
    ("leaf utilities", ("dendrite_jax.validation", "dendrite_jax.progress",
                        "dendrite_jax.config")),
    ("kernels", ("kernels_pallas",)),
    ("cache", ("dendrite_jax.cache",)),
    ("model", ("dendrite_jax.model",)),
    ("quant", ("dendrite_jax.quant",)),
    ("grammar", ("dendrite_jax.grammar",)),
    ("engine", ("dendrite_jax.engine",)),
    # frontend (LLM), search, parallel (replicas), serve, run, bench, engine_flags
    ("front ends", ("dendrite_jax",)),
)


def project_modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    """Every module of the packages, by dotted name (a package by its own name)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def layer(module: str) -> int:
    """The index in LAYERS of the module's longest matching prefix."""
    matches = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS)
               for prefix in prefixes if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer"
    return max(matches)[1]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(nodes, runs: bool):
    """(import statement, whether it runs when the module is imported): module level, class
    bodies included; not in functions, nor under `if TYPE_CHECKING:`."""
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, runs
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_nodes(node.body, False)
            yield from _import_nodes(node.orelse, runs)
        else:
            local = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            yield from _import_nodes(ast.iter_child_nodes(node), runs and not local)


def imports(module: str, path: pathlib.Path, modules: dict[str, pathlib.Path]
            ) -> list[tuple[str, bool]]:
    """(imported project module, runs at import) for each of the module's imports, a
    `from package import submodule` naming the submodule."""
    found = []
    for node, runs in _import_nodes(ast.parse(path.read_text(), str(path)).body, True):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the module's package, level - 1 packages up
                parts = module.split(".")[:None if path.name == "__init__.py" else -1]
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        found += [(t, runs) for t in targets if t.split(".")[0] in PACKAGES]
    return found


def upward_imports(modules: dict[str, pathlib.Path]) -> list[str]:
    """'module -> imported module' for each import of a higher layer."""
    return sorted({f"{module} -> {target}  ({LAYERS[layer(module)][0]} imports "
                   f"{LAYERS[layer(target)][0]})"
                   for module, path in modules.items()
                   for target, _ in imports(module, path, modules)
                   if layer(target) > layer(module)})


def import_graph(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """What importing each module runs: its module-level imports and, for each, the packages
    above it that the importer is not inside (their `__init__` runs first)."""
    graph = {module: set() for module in modules}
    for module, path in modules.items():
        for target, runs in imports(module, path, modules):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                runner = ".".join(parts[:i])
                inside = module == runner or module.startswith(runner + ".")
                if runs and runner in modules and not inside:
                    graph[module].add(runner)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one (Tarjan), each as a path that
    starts and ends at its first module."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    found = []
    for component in components:
        start = min(component)
        parents, queue = {}, collections.deque([start])
        while queue:  # shortest way back to `start` inside the component
            v = queue.popleft()
            if start in graph[v]:
                path = [v]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                found.append([*reversed(path), start])
                break
            for w in sorted(graph[v] & component):
                if w not in parents and w != start:
                    parents[w] = v
                    queue.append(w)
    return found


def test_every_module_imports_its_layer_or_lower():
    bad = upward_imports(project_modules())
    assert not bad, "imports of a higher layer (LAYERS):\n" + "\n".join(bad)


def test_no_import_cycle():
    found = cycles(import_graph(project_modules()))
    assert not found, "module-level import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """The checks themselves, on a made-up tree."""
    files = {
        "dendrite_jax/__init__.py": "from dendrite_jax.engine.core import Engine\n",
        "dendrite_jax/validation.py": "",
        "dendrite_jax/engine/__init__.py": "",
        "dendrite_jax/engine/core.py": "from dendrite_jax.cache import pool\n",
        "dendrite_jax/cache/__init__.py": "",
        "dendrite_jax/cache/pool.py": ("from typing import TYPE_CHECKING\n"
                                       "if TYPE_CHECKING:\n"
                                       "    from dendrite_jax.engine import core\n"),
        "kernels_pallas/__init__.py": "",
        "kernels_pallas/attend.py": "def attend():\n    from dendrite_jax.engine import core\n",
        # A lower layer, but importing it runs dendrite_jax/__init__.py, which imports the engine.
        "kernels_pallas/codec.py": "from dendrite_jax.validation import is_int\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = project_modules(tmp_path)
    assert upward_imports(modules) == [  # TYPE_CHECKING and function-local imports count
        "dendrite_jax.cache.pool -> dendrite_jax.engine.core  (cache imports engine)",
        "kernels_pallas.attend -> dendrite_jax.engine.core  (kernels imports engine)"]
    assert cycles(import_graph(modules)) == []  # neither of those runs at import
    (tmp_path / "dendrite_jax/cache/pool.py").write_text("from kernels_pallas import codec\n")
    assert cycles(import_graph(project_modules(tmp_path))) == [
        ["dendrite_jax", "dendrite_jax.engine.core", "dendrite_jax.cache.pool",
         "kernels_pallas.codec", "dendrite_jax"]]
