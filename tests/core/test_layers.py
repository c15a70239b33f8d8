"""The floor plan (docs/ARCHITECTURE.md): core imports neither wing; training and inference import
only core; cli imports anything; no module imports itself back through a circle. Every import counts,
lazy ones inside functions too."""
import ast
from pathlib import Path

import cxrkit

PKG = Path(cxrkit.__file__).parent
ALLOWED = {"core": {"core"}, "training": {"core", "training"}, "inference": {"core", "inference"},
           "cli": {"core", "training", "inference", "cli"}, "": {"core", "training", "inference", "cli", ""}}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    mods = {_module(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for al in node.names:  # `from . import x` names a module
                    full = f"{target}.{al.name}"
                    deps.add(full if full in mods else target)
            elif isinstance(node, ast.Import):
                deps |= {al.name for al in node.names}
        graph[mod] = {d for d in deps if d in mods and d != mod}
    return graph


def wing(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else ""


def test_wings_import_only_what_the_rule_allows():
    bad = [f"{m} -> {d}" for m, deps in import_graph().items() for d in deps
           if wing(d) not in ALLOWED[wing(m)] and not d == "cxrkit"]
    assert not bad, "arrows against the floor plan:\n" + "\n".join(sorted(bad))


def test_no_import_circles():
    graph = import_graph()
    # a package's __init__ re-exporting its own modules is not a circle of the design
    g = {m: {d for d in deps if not (graph.get(d) is not None and d == m.rpartition(".")[0])}
         for m, deps in graph.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = 1
        for d in g[m]:
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in g:
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles:\n" + "\n".join(cycles)
