"""The library reads top-down: `model_lib` never imports Prefect, and its import graph is at most 4 floors deep."""

import ast
import functools
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[2] / "model_lib"
MAX_FLOORS = 4  # a module that imports nothing of the package is floor 1


def package_imports() -> dict[str, set[str]]:
    """Each model_lib module's imports, package modules by name and others by top-level package."""
    graph = {}
    for path in LIBRARY.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        graph[path.stem] = names
    return graph


def test_the_library_never_imports_prefect_or_the_layers_above_it():
    for module, names in package_imports().items():
        tops = {name.split(".")[0] for name in names}
        assert not tops & {"prefect", "flows", "tasks"}, module


def test_the_import_graph_is_at_most_four_floors_deep():
    graph = {
        m: {n.split(".")[1] for n in names if n.startswith("model_lib.")} - {m}
        for m, names in package_imports().items()
    }

    @functools.cache
    def floor(module: str, seen: frozenset = frozenset()) -> int:
        assert module not in seen, f"import cycle through {module}"
        return 1 + max((floor(d, seen | {module}) for d in graph[module]), default=0)

    floors = {module: floor(module) for module in graph}
    assert max(floors.values()) <= MAX_FLOORS, sorted(floors.items(), key=lambda item: -item[1])
