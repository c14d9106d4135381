"""Architecture checks: the import layering in setup.cfg ([importlinter] contracts) and no import cycles.

`make test` runs `lint-imports` before pytest; these tests run the same contracts in-process on a graph that
also holds the package_dir-mapped subpackages (lat_lightning.callbacks -> callbacks/, lat_lightning.recipes
-> recipes/), which grimp cannot find on its own because it walks the root package's directory.

Every import statement counts wherever it is written (module level, inside a function or method, under
`if TYPE_CHECKING:`); `test_grimp_counts_function_level_imports` pins that down. Imports by string
(importlib.import_module) are invisible to grimp and to these checks.
"""

from __future__ import annotations

import configparser
import contextlib
import importlib.util
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP_CFG = REPO / "setup.cfg"
ROOT = "lat_lightning"


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(SETUP_CFG)
    return parser


def _mapped_subpackages() -> list[str]:
    """Subpackages of lat_lightning that setup.cfg's package_dir maps to a directory outside lat_lightning/."""
    raw = _setup_cfg().get("options", "package_dir", fallback="")
    names = [line.split("=", 1)[0].strip() for line in raw.splitlines() if "=" in line]
    return sorted(name for name in names if name.startswith(ROOT + "."))


@contextlib.contextmanager
def _grimp_finds_mapped_subpackages():
    """Let grimp take a package_dir-mapped subpackage (lat_lightning.callbacks) as a package of its own.

    grimp's package finder refuses a dotted name whose parent is a regular package (NotATopLevelModule);
    for a mapped subpackage the installed (editable) finder gives its real directory, and grimp's module
    finder then names the modules under it `lat_lightning.callbacks.*`, so imports in both directions
    resolve. This uses grimp's settings object (not public API): if a grimp upgrade moves it, fix it here.
    """
    from grimp.adaptors.packagefinder import ImportLibPackageFinder
    from grimp.application.config import settings

    class MappedPackageFinder(ImportLibPackageFinder):
        def determine_package_directories(self, package_name, file_system):
            if "." in package_name:
                spec = importlib.util.find_spec(package_name)
                if spec is not None and spec.submodule_search_locations:
                    return set(spec.submodule_search_locations)
            return super().determine_package_directories(package_name, file_system)

    previous = settings.PACKAGE_FINDER
    settings.configure(PACKAGE_FINDER=MappedPackageFinder())
    # lint-imports puts the cwd on sys.path; the config's extra root package `callbacks` needs the same.
    sys.path.insert(0, str(REPO))
    try:
        yield
    finally:
        sys.path.remove(str(REPO))
        settings.configure(PACKAGE_FINDER=previous)


def build_graph(*extra_roots: str, include_external_packages: bool = False) -> grimp.ImportGraph:
    """The lat_lightning import graph, mapped subpackages included (no cache; external packages such as omegaconf
    only when asked: the contract that library code never imports omegaconf needs them)."""
    with _grimp_finds_mapped_subpackages():
        return grimp.build_graph(
            ROOT,
            *_mapped_subpackages(),
            *extra_roots,
            include_external_packages=include_external_packages,
            cache_dir=None,
        )


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return build_graph()


# ------------------------------------------------------------------------------------------------ cycles


def strongly_connected_components(nodes, successors) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit). Returns every SCC, each sorted."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0

    for start in sorted(nodes):
        if start in index:
            continue
        index[start] = lowlink[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        work = [(start, iter(sorted(successors(start))))]
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = lowlink[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(successors(child)))))
                    advanced = True
                    break
                if child in on_stack:
                    lowlink[node] = min(lowlink[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                lowlink[parent] = min(lowlink[parent], lowlink[node])
            if lowlink[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every set of two or more modules that import each other, directly or through each other.

    Edges are the import statements as written: `import a.b.c` is an edge to a.b.c only, not to the
    packages a and a.b whose __init__ Python also runs. So a submodule that imports its own package's
    __init__ (for its re-exports) is in a cycle only if that __init__ imports it back.
    """
    modules = graph.modules
    return [
        component
        for component in strongly_connected_components(
            modules, lambda m: graph.find_modules_directly_imported_by(m) & modules
        )
        if len(component) > 1
    ]


def describe_cycle(graph: grimp.ImportGraph, component: list[str]) -> str:
    members = set(component)
    lines = [f"cycle of {len(component)} modules: {', '.join(component)}"]
    for importer in component:
        for imported in sorted(graph.find_modules_directly_imported_by(importer) & members):
            for detail in graph.get_import_details(importer=importer, imported=imported):
                lines.append(
                    f"    {importer} -> {imported} (l.{detail['line_number']}: {detail['line_contents'].strip()})"
                )
    return "\n".join(lines)


def test_no_import_cycles(graph):
    cycles = import_cycles(graph)
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(
        describe_cycle(graph, component) for component in cycles
    )


def test_scc_finds_cycles_and_only_cycles():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e", "d"}, "f": {"g"}, "g": {"f"}}
    components = strongly_connected_components(edges, edges.__getitem__)
    assert sorted(c for c in components if len(c) > 1) == [["a", "b", "c"], ["f", "g"]]
    assert sorted(sum(components, [])) == sorted(edges)
    # A long chain must not hit the recursion limit.
    chain = {str(i): {str(i + 1)} for i in range(5000)} | {"5000": {"0"}}
    assert [len(c) for c in strongly_connected_components(chain, chain.__getitem__)] == [5001]


# ------------------------------------------------------------------------------------------- the graph


def test_graph_holds_every_package(graph):
    """Every package setup.cfg installs is in the graph, package_dir-mapped ones included."""
    raw = _setup_cfg().get("options", "packages")
    packages = [line.strip() for line in raw.splitlines() if line.strip()]
    missing = [name for name in packages if name not in graph.modules]
    assert not missing, f"packages grimp did not find: {missing}"


def test_grimp_counts_function_level_imports(tmp_path, monkeypatch):
    package = tmp_path / "archprobe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("top", "func", "meth", "guarded"):
        (package / f"{name}.py").write_text("X = 1\n")
    (package / "user.py").write_text(
        "import typing\n"
        "from archprobe import top\n"
        "if typing.TYPE_CHECKING:\n"
        "    from archprobe import guarded\n"
        "def f():\n"
        "    from archprobe.func import X\n"
        "    return X\n"
        "class C:\n"
        "    def m(self):\n"
        "        from . import meth\n"
        "def g():\n"
        "    import importlib\n"
        "    return importlib.import_module('archprobe.dynamic')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    probe = grimp.build_graph("archprobe", cache_dir=None)
    imported = probe.find_modules_directly_imported_by("archprobe.user")
    assert imported == {"archprobe.top", "archprobe.func", "archprobe.meth", "archprobe.guarded"}


# ------------------------------------------------------------------------------------ import-linter


def test_import_linter_contracts(capsys):
    """The [importlinter] contracts in setup.cfg, checked with lat_lightning.callbacks in the graph."""
    from importlinter.adapters.building import GraphBuilder
    from importlinter.api import use_cases  # importing importlinter.api configures import-linter
    from importlinter.application.app_config import settings

    class MappedGraphBuilder(GraphBuilder):
        def build(self, root_package_names, cache_dir, include_external_packages=False, **kwargs):
            assert ROOT in root_package_names
            return build_graph(
                *(name for name in root_package_names if name != ROOT),
                include_external_packages=include_external_packages,
            )

    previous = settings.GRAPH_BUILDER
    settings.configure(GRAPH_BUILDER=MappedGraphBuilder())
    try:
        passed = use_cases.lint_imports(config_filename=str(SETUP_CFG), cache_dir=None, no_logo=True)
    finally:
        settings.configure(GRAPH_BUILDER=previous)
    report = capsys.readouterr().out
    assert passed, (
        "import-linter contracts broken (setup.cfg [importlinter]), lat_lightning.callbacks included:\n" + report
    )


# ------------------------------------------------------------------------------------------------ sizes

MAX_MODULE_LINES = 500  # a module a reader can hold (issue 21); ruff's PLR0913/PLR0915/C901 bound the functions


def test_no_module_is_longer_than_a_reader_can_hold():
    modules = [*(REPO / ROOT).rglob("*.py"), *(REPO / "callbacks").rglob("*.py")]
    assert len(modules) > 50  # the walk found the package
    lines = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in modules}
    too_long = {name: n for name, n in lines.items() if n > MAX_MODULE_LINES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (split them by concern): {too_long}"
