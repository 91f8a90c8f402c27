"""The tree reads as the pipeline: module sizes, the import graph, light commands, the map.

The import graph is read from the source (every ``import`` and ``from ...
import``, also those inside functions), so a lazy import cannot hide an
upward arrow.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from cohort.config import StatsConfig
from cohort.synthetic import synthetic_results
from tests.processes import python_stdout

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cohort"
MAX_LINES = 600

# Layers from the bottom up: a module may import its own layer (without cycles) or a
# lower one, never a higher one. The pipeline reads top to bottom:
# inputs -> model -> execution -> stats -> outputs / report.
LAYERS: dict[str, int] = {
    "cohort": 0,  # cohort/__init__.py
    "cohort.errors": 0,
    "cohort.config": 0,
    "cohort.inputs": 1,
    "cohort.outputs": 1,
    "cohort.model": 2,
    "cohort.stats": 2,
    "cohort.report": 3,
    "cohort.execution": 4,
    "cohort.synthetic": 4,
    "cohort.cli": 5,
    "cohort.__main__": 5,  # python -m cohort: the command line
}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported(path: Path, name: str, known: dict[str, Path]) -> Iterator[str]:
    """The cohort modules ``path`` imports (resolved to modules of ``known``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target.startswith("cohort") and target != name:
                yield target


def layer_of(module: str) -> int:
    """The layer of ``module``: its own entry of :data:`LAYERS` or its package's.

    A module in no listed package (a new package or a new top-level module of
    ``cohort``, which would otherwise fall to the root's layer 0) is refused.
    """
    package = module
    while package not in LAYERS or (package == "cohort" and module != "cohort"):
        package = package.rpartition(".")[0]
        if not package:
            raise LookupError(
                f"{module} is in no layer: add it (or its package) to LAYERS in "
                "tests/test_layout.py, at the layer of its pipeline stage"
            )
    return LAYERS[package]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(imported(path, name, known)) for name, path in known.items()}


def test_no_module_passes_600_lines() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert max(sizes.values()) <= MAX_LINES, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_no_upward_arrow(graph: dict[str, set[str]]) -> None:
    upward = [
        f"{source} -> {target}"
        for source, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(source) and target != "cohort"
    ]
    assert not upward


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    # the package __init__ files that only re-export (cohort.stats, cohort.report) point
    # down into their own modules; they are nodes like any other
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycle.extend([*path[path.index(target) :], target])
                return True
            if target not in state and visit(target, [*path, target]):
                return True
        state[node] = 2
        return False

    for node in sorted(graph):
        if node not in state and visit(node, [node]):
            break
    assert not cycle, " -> ".join(cycle)


def test_every_module_is_in_a_layer(graph: dict[str, set[str]]) -> None:
    layers = {name: layer_of(name) for name in graph}  # raises for a module in none
    assert layers["cohort.execution.driver"] == LAYERS["cohort.execution"]
    assert layers["cohort"] == 0 and layers["cohort.synthetic"] == LAYERS["cohort.synthetic"]


@pytest.mark.parametrize("module", ["cohort.robustness.perturb", "cohort.newmodule", "numpy"])
def test_layer_of_refuses_a_module_in_no_layer(module: str) -> None:
    with pytest.raises(LookupError, match=rf"{re.escape(module)} is in no layer: add it"):
        layer_of(module)


def modules_after(*argv: str) -> set[str]:
    """Top-level modules a fresh interpreter has imported after ``cohort ARGV``."""
    code = (
        "import sys\n"
        "from cohort.cli.main import main\n"
        "try:\n"
        f"    main({list(argv)!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('MODULES', sorted({m.split('.')[0] for m in sys.modules}))\n"
    )
    line = next(x for x in python_stdout(code).splitlines() if x.startswith("MODULES"))
    return set(json.loads(line.removeprefix("MODULES ").replace("'", '"')))


def test_help_imports_no_torch_and_no_pandas() -> None:
    loaded = modules_after("--help")
    assert "click" in loaded  # the probe works
    assert not {"torch", "torchvision", "pandas", "ray"} & loaded


def test_stats_and_report_never_import_torch(tmp_path: Path) -> None:
    """(``cohort validate`` builds the network's architecture to check sizes: it does.)"""
    folder = synthetic_results(
        tmp_path / "run", n_per_cohort=4, cfg=StatsConfig(bootstrap=20, permutations=9)
    )
    for argv in (("stats", str(folder)), ("report", str(folder))):
        loaded = modules_after(*argv)
        assert "pandas" in loaded  # the command did its work
        assert "torch" not in loaded, argv
    assert (folder / "report" / "report.html").is_file()


def test_readme_map_matches_the_tree() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## The code") :]
    block = block[block.index("```") + 3 :]
    block = block[: block.index("```")]
    listed = set(re.findall(r"\b([a-z_]+(?:/[a-z_]+)*\.py|[a-z_]+/)", block))
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "jobs").glob("*.py")]
    tree = {str(p.relative_to(ROOT)) for p in files if p.name != "__init__.py"}
    tree |= {f"{p.relative_to(ROOT)}/" for p in [PACKAGE, *PACKAGE.rglob("*")] if p.is_dir()}
    tree = {t for t in tree if "__pycache__" not in t}
    named = set()
    for entry in listed:
        matches = {t for t in tree if t.endswith(entry) and ("/" + t).endswith("/" + entry)}
        assert matches, f"README's map names {entry}, which is not in the tree"
        named |= matches
    modules_in_tree = {t for t in tree if t.endswith(".py")}
    assert modules_in_tree <= named, sorted(modules_in_tree - named)
