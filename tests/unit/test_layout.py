"""The code reads top-down: `model_lib` never imports Prefect, `tasks` never imports `flows`, the library's
import graph is at most 6 floors deep, and docs/layout.md names every module."""

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "model_lib"
MAX_FLOORS = 6  # a module that imports nothing of the package is floor 1; each job its own module (issue 57) puts
# the stores on the local writes, the sources on the stores and the cache on the sources: training is floor 6


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


def test_tasks_never_import_the_flows():
    for path in (ROOT / "tasks").glob("*.py"):
        tree = ast.parse(path.read_text())
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in modules if m.split(".")[0] == "flows"}, path.name


def test_the_layout_page_names_every_module():
    page = (ROOT / "docs" / "layout.md").read_text()
    modules = [p.relative_to(ROOT).as_posix() for layer in ("flows", "tasks", "model_lib")
               for p in sorted((ROOT / layer).glob("*.py")) if p.name != "__init__.py"]  # fmt: skip
    assert [m for m in modules if f"`{m}`" not in page] == []


def test_every_library_and_flow_module_has_a_test_file_named_for_it_or_one_named_on_the_layout_page():
    page = (ROOT / "docs" / "layout.md").read_text()
    covered = {line.split("|")[1].strip(" `"): line for line in page.splitlines() if line.startswith("| `")}
    named = {path.stem.removeprefix("test_") for path in (ROOT / "tests").rglob("test_*.py")}
    missing = []
    for layer in ("flows", "model_lib"):
        for path in sorted((ROOT / layer).glob("*.py")):
            module = path.relative_to(ROOT).as_posix()
            if path.name == "__init__.py" or path.stem in named:
                continue
            files = re.findall(r"`(tests/[\w/]+\.py)`", covered.get(module, ""))
            if not files or not all((ROOT / file).is_file() for file in files):
                missing.append(module)
    assert missing == [], "no test file named for these, and none (or a missing one) in docs/layout.md's table"
