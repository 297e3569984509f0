"""The package layering: no module imports from a package above its own, and no import cycles.

Order, low to high (same level on one line)::

    errors, jsonio, checkpoints, kernels, lang
    model
    recipe
    data
    monitor
    train
    backends
    eval
    launch, arena
    cli, demo, hebtron/__init__.py, hebtron/__main__.py

A module's layer is its first component after ``hebtron.`` (``hebtron/cli.py`` is ``cli``,
``hebtron/demo/...`` is ``demo``, ``kernels/`` is installed as ``hebtron.kernels``). Every import
counts: top-level, lazy (inside functions), relative, ``if TYPE_CHECKING:`` (the rule is about
what a package may know of, not only about what runs), and ``importlib.import_module`` or
``python -m`` targets spelled as string constants that name a hebtron module.

The sources are read with :mod:`ast`; nothing under ``hebtron`` is imported, so the test is fast
and works when an import is broken.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package directory -> dotted name of that package
SOURCE_ROOTS: dict[Path, str] = {ROOT / "hebtron": "hebtron", ROOT / "kernels": "hebtron.kernels"}

LAYER_ORDER: list[tuple[str, ...]] = [
    ("errors", "jsonio", "checkpoints", "kernels", "lang"),  # lang: hebtron/lang.py, language ids (recipe and data use them)
    ("model",),
    ("recipe",),
    ("data",),
    ("monitor",),
    ("train",),
    ("backends",),
    ("eval",),
    ("launch", "arena"),  # arena: generate and serve load models through eval
    ("cli", "demo", "<top>"),
]
RANK: dict[str, int] = {layer: rank for rank, layers in enumerate(LAYER_ORDER) for layer in layers}
TOP = "<top>"  # hebtron/__init__.py, hebtron/__main__.py


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted module name (the deepest one that exists among hebtron's modules)
    path: Path
    line: int
    lazy: bool  # inside a function body: runs on call, not on import
    type_checking: bool  # under ``if TYPE_CHECKING:``
    dynamic: bool  # a string constant (import_module / ``-m``), not an import statement

    def where(self) -> str:
        kind = ["lazy"] * self.lazy + ["TYPE_CHECKING"] * self.type_checking + ["string"] * self.dynamic
        suffix = f" ({', '.join(kind)})" if kind else ""
        return f"{self.path.relative_to(ROOT)}:{self.line}{suffix}"


def discover_modules() -> dict[str, Path]:
    """Dotted module name -> source path, for every .py under hebtron/ and kernels/."""
    modules: dict[str, Path] = {}
    for base, package in SOURCE_ROOTS.items():
        for path in sorted(base.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


MODULES = discover_modules()


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def is_command_module(module: str) -> bool:
    """``hebtron.<pkg>.commands``: a package's subcommands for ``hebtron``'s parser. These are the
    CLI layer split by topic (only the CLI imports them), so they sit with ``cli``, whatever
    package holds them: ``train/commands.py`` may pick an engine from ``backends/``."""
    parts = module.split(".")
    return len(parts) == 3 and parts[2] == "commands"


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return TOP
    if is_command_module(module):
        return "cli"
    return parts[1]


def resolve(name: str) -> str | None:
    """The deepest existing hebtron module that ``name`` (a module or ``module.attribute``) names."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, path: Path):
        self.module = module
        self.path = path
        self.package = module if is_package(module) else module.rpartition(".")[0]
        self.imports: list[Import] = []
        self._function_depth = 0
        self._type_checking_depth = 0

    def _add(self, name: str, node: ast.AST, dynamic: bool = False) -> None:
        target = resolve(name)
        if target is None:
            return
        self.imports.append(Import(
            importer=self.module, target=target, path=self.path, line=node.lineno,
            lazy=self._function_depth > 0, type_checking=self._type_checking_depth > 0, dynamic=dynamic,
        ))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "hebtron" or alias.name.startswith("hebtron."):
                self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            if node.level > 1:
                base = base[: -(node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if not (source == "hebtron" or source.startswith("hebtron.")):
            return
        for alias in node.names:
            # ``from hebtron.data import sft`` imports the submodule hebtron.data.sft
            self._add(f"{source}.{alias.name}" if alias.name != "*" else source, node)

    def visit_Constant(self, node: ast.Constant) -> None:
        # importlib.import_module("hebtron.x.y"), lazy-export tables, ``python -m hebtron.x.y``
        # (dotted names only: a bare "hebtron" is a program or logger name far more often)
        if isinstance(node.value, str) and "." in node.value and node.value in MODULES and node.value != self.module:
            self._add(node.value, node, dynamic=True)

    def _visit_function(self, node: ast.AST) -> None:
        self._function_depth += 1
        self.generic_visit(node)
        self._function_depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _visit_function

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        self._type_checking_depth += 1
        for child in node.body:
            self.visit(child)
        self._type_checking_depth -= 1
        for child in node.orelse:
            self.visit(child)


def collect_imports() -> list[Import]:
    imports: list[Import] = []
    for module, path in MODULES.items():
        collector = _Collector(module, path)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        imports.extend(collector.imports)
    return imports


IMPORTS = collect_imports()


def upward_imports(imports: list[Import]) -> list[Import]:
    found: dict[tuple[str, str, int], Import] = {}  # one per statement: ``from x import a, b`` is one
    for imp in imports:
        if (layer_of(imp.importer) in RANK and layer_of(imp.target) in RANK
                and RANK[layer_of(imp.target)] > RANK[layer_of(imp.importer)]):
            found.setdefault((imp.importer, imp.target, imp.line), imp)
    return list(found.values())


def format_violation(imp: Import) -> str:
    return (f"{imp.importer} [{layer_of(imp.importer)}] imports {imp.target} [{layer_of(imp.target)}]"
            f" at {imp.where()}")


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (or a self-loop), each given as one
    concrete cycle through its nodes, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # recursion depth is bounded by the module count (~120)
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strongconnect(w)
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
            if len(component) > 1 or v in edges.get(v, ()):
                components.append(component)

    for node in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if node not in index:
            strongconnect(node)

    cycles = []
    for component in components:
        start = min(component)
        # shortest path back to start inside the component (BFS)
        previous: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(edges.get(v, ())):
                    if w not in component:
                        continue
                    if w == start:
                        found = v
                        break
                    if w not in previous:
                        previous[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [found]
        while path[-1] != start:
            path.append(previous[path[-1]])
        cycles.append([*reversed(path), start])
    return sorted(cycles)


def package_of(module: str) -> str:
    """The package a module belongs to; modules directly under hebtron/ (errors, cli, demo) are
    their own node, since they sit at opposite ends of the order."""
    if is_package(module):
        return module
    if is_command_module(module):
        return "hebtron.cli"
    parent = module.rpartition(".")[0]
    return module if parent == "hebtron" else parent


def runtime_module_edges(imports: list[Import]) -> dict[str, set[str]]:
    """What importing a module imports: top-level statements (module and class bodies, including
    ``try``/``if`` blocks), not function bodies, not TYPE_CHECKING, not strings. Importing
    ``hebtron.a.b`` also runs ``hebtron/a/__init__.py``, so ancestors of the target count, except
    those that are ancestors of the importer too (already being imported by then)."""
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.lazy or imp.type_checking or imp.dynamic:
            continue
        targets = {imp.target}
        parts = imp.target.split(".")
        importer_ancestors = {".".join(imp.importer.split(".")[:i]) for i in range(1, imp.importer.count(".") + 2)}
        for i in range(1, len(parts)):
            ancestor = ".".join(parts[:i])
            if ancestor not in importer_ancestors:
                targets.add(ancestor)
        targets.discard(imp.importer)
        edges.setdefault(imp.importer, set()).update(targets)
    return edges


# --- the tests -------------------------------------------------------------------------------------


def test_every_module_has_a_known_layer():
    unknown = sorted({layer_of(m) for m in MODULES} - set(RANK))
    assert not unknown, (
        f"packages {unknown} are not in the layer order of tests/test_import_order.py; add them to LAYER_ORDER"
    )


def test_the_scan_sees_imports():
    # guards the collector itself: if it silently found nothing, the order test would pass vacuously
    assert len(MODULES) > 50
    assert any(imp.importer == "hebtron.cli" and imp.target == "hebtron.errors" for imp in IMPORTS)
    assert any(imp.lazy for imp in IMPORTS)
    assert any(imp.dynamic for imp in IMPORTS)  # cli's COMMAND_MODULES


def test_no_module_imports_from_a_layer_above_it():
    violations = upward_imports(IMPORTS)
    if violations:
        pytest.fail(
            f"{len(violations)} upward imports (order, low to high: "
            + " < ".join("/".join(layers) for layers in LAYER_ORDER)
            + "):\n  " + "\n  ".join(format_violation(imp) for imp in violations)
        )


def test_no_package_level_import_cycles():
    """Edges between packages (hebtron.data, hebtron.backends.megatron, ...), every import counted:
    with the order rule this only adds cycles inside one layer (e.g. backends <-> backends.megatron)."""
    edges: dict[str, set[str]] = {}
    for imp in IMPORTS:
        source, target = package_of(imp.importer), package_of(imp.target)
        if source != target:
            edges.setdefault(source, set()).add(target)
    cycles = find_cycles(edges)
    if cycles:
        lines = []
        for cycle in cycles:
            hops = []
            for a, b in zip(cycle, cycle[1:]):
                example = next(imp for imp in IMPORTS if package_of(imp.importer) == a and package_of(imp.target) == b)
                hops.append(f"{a} -> {b} ({example.importer} imports {example.target} at {example.where()})")
            lines.append("; ".join(hops))
        pytest.fail("package import cycles:\n  " + "\n  ".join(lines))


def test_no_module_level_import_cycles():
    """Cycles among imports that run when a module is imported (e.g. data/sft.py <-> train/setup.py
    at top level) make import order matter and break on the first refactor."""
    edges = runtime_module_edges(IMPORTS)
    cycles = find_cycles(edges)
    if cycles:
        lines = []
        for cycle in cycles:
            hops = []
            for a, b in zip(cycle, cycle[1:]):
                at = next((imp.where() for imp in IMPORTS
                           if imp.importer == a and (imp.target == b or imp.target.startswith(b + "."))
                           and not (imp.lazy or imp.type_checking or imp.dynamic)), "?")
                hops.append(f"{a} -> {b} ({at})")
            lines.append("; ".join(hops))
        pytest.fail("module import cycles at import time:\n  " + "\n  ".join(lines))


# --- the checker checks itself on small synthetic graphs ---------------------------------------------


def test_find_cycles_finds_and_names_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}}) == []
    assert find_cycles({"a": {"a"}}) == [["a", "a"]]


def test_upward_rule_on_synthetic_imports():
    def imp(a: str, b: str) -> Import:
        return Import(a, b, ROOT / "x.py", 1, False, False, False)

    bad = imp("hebtron.data.sft", "hebtron.train.setup")
    fine = [imp("hebtron.train.setup", "hebtron.data.sft"), imp("hebtron.model.decoder", "hebtron.kernels.ssd"),
            imp("hebtron.kernels.ssd", "hebtron.errors"), imp("hebtron.cli", "hebtron.demo")]
    assert upward_imports([bad, *fine]) == [bad]
    assert layer_of("hebtron") == layer_of("hebtron.__main__") == TOP
    assert layer_of("hebtron.kernels.ssd") == "kernels"


def test_runtime_edges_keep_top_level_imports_and_their_packages_only():
    def imp(a: str, b: str, lazy: bool = False, type_checking: bool = False) -> Import:
        return Import(a, b, ROOT / "x.py", 1, lazy, type_checking, False)

    cyclic = [imp("hebtron.data.sft", "hebtron.train.setup"), imp("hebtron.train.setup", "hebtron.data.sft")]
    edges = runtime_module_edges(cyclic)
    assert edges["hebtron.data.sft"] == {"hebtron.train", "hebtron.train.setup"}  # train/__init__.py runs too
    assert ["hebtron.data.sft", "hebtron.train.setup", "hebtron.data.sft"] in find_cycles(edges)
    assert find_cycles(runtime_module_edges([cyclic[0], imp("hebtron.train.setup", "hebtron.data.sft", lazy=True)])) == []
    assert find_cycles(runtime_module_edges([cyclic[0], imp("hebtron.train.setup", "hebtron.data.sft", type_checking=True)])) == []
    # a sibling in the same package: its package is already being imported, not an edge
    assert runtime_module_edges([imp("hebtron.data.sft", "hebtron.data.packing")]) == {
        "hebtron.data.sft": {"hebtron.data.packing"}}
