"""The package layers, checked on the source: ``fuse`` (the core) never imports ``train`` or ``analysis``;
``train`` and ``analysis`` both build on ``fuse`` but never import each other; inside ``fuse``, the
library (models, members, merge, ...) never imports the command-line layer; and no module takes part in an
import cycle.

Every import statement counts, also one inside a function (a lazy import is still a dependency),
and relative imports are resolved against the importing module's package.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fuse", "train", "analysis")
# importing package -> packages it must never import
FORBIDDEN = {"fuse": {"train", "analysis"}, "train": {"analysis"}, "analysis": {"train"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_statements(source: str, module: str, is_package: bool = False) -> list[tuple[str, list[str]]]:
    """``(absolute module, names imported from it)`` for every import in ``source`` (the text of module
    ``module``), also inside functions; ``import x.y`` gives ``("x.y", [])``."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            out.append((mod, [alias.name for alias in node.names]))
    return out


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module ``source`` may import; ``from x import y`` counts as ``x`` and ``x.y`` (``y`` may be a
    submodule)."""
    return {m for mod, names in import_statements(source, module, is_package)
            for m in (mod, *(f"{mod}.{n}" for n in names))}


def layer_violations() -> set[tuple[str, str]]:
    found = set()
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            for mod in imported_modules(path.read_text(), module_name(path), path.name == "__init__.py"):
                top = mod.split(".")[0]
                if top in FORBIDDEN[pkg]:
                    found.add((str(path.relative_to(REPO)), top))
    return found


def test_layers_are_respected():
    assert layer_violations() == set()


# the command-line layer of fuse: click groups, commands and their plumbing (one-line errors, start-up)
CLI_LAYER = ("fuse.cli", "fuse.cli_utils", "fuse.commands", "fuse.__main__")


def is_cli(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in CLI_LAYER)


def test_the_library_does_not_import_the_cli_layer():
    """fuse's library code is what the Python API runs: it must not depend on click plumbing (the CLI
    calls the library, never the other way). ``fuse.testing`` (test builders with their own command
    lines) is not library code."""
    found = set()
    for path in sorted((REPO / "fuse").rglob("*.py")):
        mod = module_name(path)
        if is_cli(mod) or mod.startswith("fuse.testing"):
            continue
        for imported in imported_modules(path.read_text(), mod, path.name == "__init__.py"):
            if is_cli(imported):
                found.add((str(path.relative_to(REPO)), imported))
    assert found == set()


def test_the_recipe_schema_imports_nothing_downstream():
    """fuse.recipe is read by everything (merge, analysis, the toy family); the merge methods, member
    formats and models build on it, never the other way (their names and rules are checked in
    fuse.merge.validate)."""
    path = REPO / "fuse" / "recipe.py"
    allowed = {"fuse.errors", "fuse.dtypes", "fuse.names", "fuse.units"}  # leaf modules (and names in them)
    imported = imported_modules(path.read_text(), "fuse.recipe")
    downstream = {m for m in imported
                  if m.startswith("fuse.") and m not in allowed and m.rpartition(".")[0] not in allowed}
    assert downstream == set()
    assert "fuse.merge.methods" in imported_modules("from .merge.methods import method_info\n", "fuse.recipe")


def module_dependencies(known: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of ``known`` it imports. ``from pkg import sub`` depends on the submodule
    ``pkg.sub`` when there is one, on ``pkg`` (its ``__init__``) otherwise."""
    graph = {}
    for mod, path in known.items():
        deps = set()
        for src, names in import_statements(path.read_text(), mod, path.name == "__init__.py"):
            for target in [f"{src}.{n}" if f"{src}.{n}" in known else src for n in names] or [src]:
                if target in known and target != mod:
                    deps.add(target)
        graph[mod] = deps
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    cycles.append(sorted(comp))
    return cycles


def test_no_import_cycles():
    """A cycle (train.config <-> train.fusion was one) makes import order matter and hides which module
    is the lower layer; lazy imports inside functions count, since they only postpone the cycle."""
    known = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    assert import_cycles(module_dependencies(known)) == []
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the checker


def test_the_scan_resolves_relative_and_lazy_imports():
    """The checker itself: relative imports resolve against the package, imports inside functions count."""
    source = "from ..members import load_member\nfrom . import budget\n" \
             "def f():\n    from ..toyfamily import compare\n    import train.api\n"
    mods = imported_modules(source, "fuse.model.fused")
    assert {"fuse.members", "fuse.members.load_member", "fuse.model", "fuse.model.budget", "fuse.toyfamily",
            "train.api"} <= mods
    assert "fuse.members" in imported_modules("from .members import x\n", "fuse", is_package=True)
