"""The import graph of model/: no module imports one that imports it back, and the network never imports the
text / generation layers. Read from the source with ast (module-level and function-level imports alike), so a
lazy `from .x import y` inside a function counts as much as one at the top."""

import ast
import os

MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model")
PACKAGE = "model"
# the modules that compute the network, and the layers above it they must not reach (some may not exist yet)
NETWORK = ("modeling", "modeling_v1", "cache", "kernels", "quantization")
TEXT_LAYERS = ("chat", "generation", "engine", "conversation", "formats", "service", "remote")


def model_modules() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(MODEL_DIR) if f.endswith(".py"))


def imported_modules(module: str, known: set[str]) -> set[str]:
    """The model/ modules `module` imports anywhere in its source (the package itself counts as __init__)."""
    with open(os.path.join(MODEL_DIR, module + ".py"), encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=module + ".py")
    found = set()

    def add(dotted: str) -> None:  # "x" or "x.y" below the package; "" is the package
        name = dotted.split(".")[0] if dotted else "__init__"
        if name in known:
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                base = node.module or ""
            elif node.level == 0 and node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                base = node.module[len(PACKAGE) + 1:]
            else:
                continue
            if base:
                add(base)
            else:  # from . import x: a module when x is one, else a name of the package
                for alias in node.names:
                    add(alias.name if alias.name in known else "")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name[len(PACKAGE) + 1:])
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    known = set(model_modules())
    return {m: imported_modules(m, known) for m in known}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_lazy_and_absolute_imports():
    # the reader itself: a function-level relative import and an absolute one both count
    assert "config" in import_graph()["tokenizer"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_model():
    graph = import_graph()
    graph.pop("__init__", None)  # the package imports everything it exports; nothing below imports it back
    graph.pop("__main__", None)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in model/: " + " -> ".join(cycle)


def test_nothing_below_the_package_imports_the_package():
    importers = sorted(m for m, deps in import_graph().items() if "__init__" in deps and m != "__main__")
    assert not importers, f"{importers} import model/__init__.py, which imports every module"


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_network_does_not_import_the_text_layers():
    graph = import_graph()
    direct = {m: sorted(graph[m] & set(TEXT_LAYERS)) for m in NETWORK if graph[m] & set(TEXT_LAYERS)}
    assert not direct, f"network modules import the text / generation layers: {direct}"
    indirect = {m: sorted(reachable(graph, m) & set(TEXT_LAYERS)) for m in NETWORK
                if reachable(graph, m) & set(TEXT_LAYERS)}
    assert not indirect, f"network modules reach the text / generation layers through other modules: {indirect}"


def test_modeling_has_no_family_name_tests():
    # the network reads what differs between the families from the config (e.g. config.rope_ratio_scales),
    # so that a new family is a config entry, not a silent fall-through to another family's policy
    with open(os.path.join(MODEL_DIR, "modeling.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                 for op in node.ops):
            for side in [node.left, *node.comparators]:
                if (isinstance(side, ast.Attribute) and side.attr == "family") or \
                        (isinstance(side, ast.Name) and side.id == "family"):
                    found.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not found, f"modeling.py tests the family name: {found}"
