"""The README says what the code does: the tests behind its Reliability table exist,
and the figures it quotes from the code are the code's.

Each row's right column cites tests in backticks: a bare name (`test_x`) is a test of
``tests/test_reliability.py``, as the table's preamble says; a test elsewhere is
cited by its node id (`tests/test_y.py::test_x`). Every row must cite at least one,
and every cited test must be defined in the suite, so a renamed or deleted test
breaks the build instead of leaving a guarantee held by nothing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODULE = "tests/test_reliability.py"
CITED = re.compile(r"`((?:tests/[\w/]+\.py::)?test_\w+)`")
FILES = re.compile(r"`(tests/[\w/]+\.py)(?:::\w+)?`")


def reliability_rows(readme: str) -> list[tuple[str, str]]:
    """(guarantee, how it is tested) for each data row of the Reliability table."""
    section = readme[readme.index("\n## Reliability\n") :]
    section = section[: section.index("\n## ", 1)]
    rows = []
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if cells[0] == "guarantee" or set(cells[0]) <= {"-", ":"}:
            continue  # the header and the rule under it
        rows.append((cells[0], cells[-1]))
    return rows


def node_ids(cell: str) -> list[str]:
    """The node ids a right-column cell cites."""
    return [name if "::" in name else f"{DEFAULT_MODULE}::{name}" for name in CITED.findall(cell)]


def defined_tests(module: str) -> set[str]:
    """Node ids of the test functions ``module`` defines (also in ``Test*`` classes)."""
    tree = ast.parse((ROOT / module).read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name.startswith("test_"):
                found.add(f"{module}::{node.name}")
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name.startswith("test_"):
                    found.add(f"{module}::{node.name}::{item.name}")
    return found


def test_the_parser_reads_a_table_as_the_readme_writes_it() -> None:
    readme = (
        "intro\n\n## Reliability\n\n| guarantee | how it is tested |\n|---|---|\n"
        "| **A.** x `a\\|b` | `test_one` (`tests/node_loss_run.py`), "
        "`tests/test_other.py::test_two` |\n| **B.** | nothing cited |\n\n## On a cluster\n"
        "| not | `test_three` |\n"
    )
    rows = reliability_rows(readme)
    assert [guarantee for guarantee, _ in rows] == ["**A.** x `a\\|b`", "**B.**"]
    assert node_ids(rows[0][1]) == [f"{DEFAULT_MODULE}::test_one", "tests/test_other.py::test_two"]
    assert node_ids(rows[1][1]) == []


def test_every_reliability_row_names_tests_that_exist() -> None:
    rows = reliability_rows((ROOT / "README.md").read_text())
    assert len(rows) >= 14, rows  # the table as it stands; a lost row is a lost guarantee
    missing, uncited, files = [], [], []
    for guarantee, cell in rows:
        cited = node_ids(cell)
        if not cited:
            uncited.append(guarantee[:80])
        for node in cited:
            module = node.partition("::")[0]
            if not (ROOT / module).is_file() or node not in defined_tests(module):
                missing.append(node)
        files += [name for name in FILES.findall(cell) if not (ROOT / name).is_file()]
    assert not uncited, f"rows citing no test: {uncited}"
    assert not missing, f"the README cites tests the suite does not define: {missing}"
    assert not files, f"the README names files that do not exist: {files}"


def test_readme_gives_the_medicalnet_parameter_counts_of_the_built_networks() -> None:
    """Counted on the networks cohort builds (MONAI's modules, no weights loaded)."""
    from cohort.model import medicalnet

    readme = " ".join((ROOT / "README.md").read_text().split())
    quoted = re.search(
        r"the networks built have ([\d.]+) M, ([\d.]+) M, ([\d.]+) M and ([\d.]+) M "
        r"parameters \(ResNet-10, -18, -34, -50",
        readme,
    )
    assert quoted is not None, "the README no longer quotes MedicalNet's parameter counts"
    counts = [sum(p.numel() for p in medicalnet.build(d).parameters()) for d in (10, 18, 34, 50)]
    assert [f"{n / 1e6:.2f}" for n in counts] == list(quoted.groups())
