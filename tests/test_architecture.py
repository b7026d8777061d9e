"""The layering of docs/architecture.md holds: no import circle between modules, and no
algorithm layer importing the layers that wire files, serve, report or build the world."""

import ast
from pathlib import Path

import genattr

PACKAGE = Path(genattr.__file__).parent
# docs/architecture.md's layers: algorithms, customization and the world below; the layer
# that opens files and wires stages, the shells and the reports above.
LOWER = ("data", "features", "store", "heads", "search", "calibrate", "evaluate", "vectors",
         "methods", "customize", "attribution", "world", "counterfactual")  # fmt: skip
UPPER = ("workflows", "serve", "report", "cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> genattr modules it imports (anywhere in the file); package __init__ files
    are left out as targets, since they only re-export."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = {m for m, p in files.items() if p.name != "__init__.py"}

    def resolve(name: str) -> str | None:
        while name:
            if name in modules:
                return name
            name = name.rpartition(".")[0]
        return None

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = resolve(name) if name.startswith("genattr.") else None
                if target and target != mod:
                    targets.add(target)
        graph[mod] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
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
                        found.append(sorted(comp))
    return found


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_algorithms_do_not_import_upward():
    upward = [
        f"{m} -> {t}"
        for m, targets in import_graph().items()
        if _layer(m) in LOWER
        for t in targets
        if _layer(t) in UPPER
    ]
    assert upward == []
