"""The report: figures, tables and sentences from a result folder, checked in Chromium.

Most tests build a result folder from synthetic tables (no model); one runs the
real pipeline on the small phantom cohort. The browser tests open report.html
in headless Chromium (Debian's ``chromium``, installed here when missing) with
no network, read back what the page's own script records on ``<body>`` (images
loaded, script and resource errors), watch Chromium's console log, and take a
screenshot.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cohort.cli.main import main
from cohort.inputs.manifest import read_manifest
from cohort.report import write_report
from cohort.report.figures import pca_2d
from cohort.report.subjects import robust_outliers
from cohort.synthetic import synthetic_results

pytestmark = pytest.mark.timeout(240)

FIGURES_TWO_COHORTS = (
    "similarity_table",
    "cosines_conv-1",
    "cosines_conv-3",
    "cosines_conv-5",
    "depth",
    "pca",
    "overlay",
)


# ------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def two_cohorts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two cohorts of 6, one failed subject each, one subject with femur == tibia."""
    return synthetic_results(
        tmp_path_factory.mktemp("two") / "results", n_per_cohort=6, failed=1, identical=1
    )


@pytest.fixture(scope="module")
def two_report(two_cohorts: Path) -> Path:
    return write_report(two_cohorts)


@pytest.fixture(scope="module")
def one_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_results(
        tmp_path_factory.mktemp("one") / "results", n_per_cohort=5, cohorts=("all",)
    )


def subject_ids(results: Path) -> list[str]:
    manifest = json.loads((results / "run.json").read_text())["manifest"]
    return [s.subject_id for s in read_manifest(Path(manifest))]


# ------------------------------------------------------------- page content


def test_report_writes_every_figure_as_png_and_svg_and_embeds_them(two_report: Path) -> None:
    folder = two_report.parent
    page = two_report.read_text()
    for name in FIGURES_TWO_COHORTS:
        assert (folder / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (folder / f"{name}.svg").read_text().lstrip().startswith("<?xml")
        assert f'id="fig-{name}"' in page
    assert page.count('src="data:image/png;base64,') == len(FIGURES_TWO_COHORTS)
    # self-contained: nothing is fetched from elsewhere
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "<link" not in page


def test_report_lists_every_subject_done_and_failed(two_cohorts: Path, two_report: Path) -> None:
    page = two_report.read_text()
    ids = subject_ids(two_cohorts)
    assert len(ids) == 14
    for sid in ids:
        assert f"<td>{sid}</td>" in page, sid


def test_report_of_a_run_with_errors_shows_them(two_cohorts: Path, two_report: Path) -> None:
    page = two_report.read_text()
    errors = pd.read_parquet(two_cohorts / "errors.parquet")
    assert len(errors) == 2
    section = page[page.index('<section id="errors">') :]
    assert "2 subject(s) failed" in section
    for _, row in errors.iterrows():
        assert row["subject_id"] in section
        assert "FileNotFoundError" in section
        assert row["message"].split(";")[0] in section
    assert "No subject failed" not in page
    assert page.count('<tr class="failed">') == 2 + 2  # subjects table + errors table


def test_sanity_flags_are_highlighted(two_report: Path) -> None:
    page = two_report.read_text()
    stats = page[page.index('id="stats"') : page.index("<h3>Sanity flags</h3>")]
    assert '<tr class="flagged">' in stats
    assert "cosine-one" in stats
    assert "row(s) carry a sanity flag" in page


def test_one_cohort_leaves_out_between_cohort_plots_and_says_why(one_cohort: Path) -> None:
    path = write_report(one_cohort)
    page = path.read_text()
    assert "This run has one cohort (all), so the between-cohort plots" in page
    assert "needs at least two cohorts" in page
    assert not list(path.parent.glob("cosines_*"))
    for name in ("similarity_table", "depth", "pca", "overlay"):
        assert (path.parent / f"{name}.png").is_file()
    assert "No subject failed." in page


def test_missing_manifest_skips_the_overlay_with_a_sentence(
    two_cohorts: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "results"
    shutil.copytree(two_cohorts, copy, ignore=shutil.ignore_patterns("report"))
    run = json.loads((copy / "run.json").read_text())
    del run["manifest"]
    (copy / "run.json").write_text(json.dumps(run))
    path = write_report(copy, tmp_path / "elsewhere")
    assert path == tmp_path / "elsewhere" / "report.html"
    page = path.read_text()
    assert "No image overlay: run.json does not record the manifest" in page
    assert not (path.parent / "overlay.png").exists()
    # without the manifest the subjects still come from the features and errors
    for sid in subject_ids(two_cohorts):
        assert f"<td>{sid}</td>" in page


def test_report_command(two_cohorts: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["report", str(two_cohorts), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "report.html").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["report", str(empty)])
    assert result.exit_code == 2
    assert "run.json is missing" in result.output


def test_pca_2d_exact_on_points_along_a_line() -> None:
    t = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    direction = np.array([3.0, 4.0, 0.0]) / 5.0
    scores, share = pca_2d(t[:, None] * direction[None, :] + 7.0)
    np.testing.assert_allclose(share, [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(scores[:, 0], t, atol=1e-12)  # largest loading positive
    np.testing.assert_allclose(scores[:, 1], 0.0, atol=1e-12)


def test_robust_outliers_finds_the_planted_one() -> None:
    cosines = [0.90, 0.91, 0.92, 0.93, 0.94, 0.60]
    similarity = pd.DataFrame(
        {
            "subject_id": [f"s{i}" for i in range(6)],
            "cohort": "a",
            "layer": "conv-1",
            "region_a": "tibia",
            "region_b": "femur",
            "cosine": cosines,
        }
    )
    hits = robust_outliers(similarity)
    assert hits["subject_id"].tolist() == ["s5"]
    assert hits["pair"].tolist() == ["tibia-femur"]
    assert float(hits["z"].iloc[0]) < -3.5


# ---------------------------------------------------------------- the browser


def chromium_binary() -> str:
    """Debian's chromium; installed with apt-get when missing (as `make test` runs in CI)."""
    found = shutil.which("chromium")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and this user cannot apt-get install it")
    install = subprocess.run(
        [apt, "install", "-y", "--no-install-recommends", "chromium"],
        capture_output=True,
        text=True,
        timeout=900,
        env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        check=False,
    )
    if install.returncode != 0:
        subprocess.run([apt, "update"], capture_output=True, timeout=600, check=False)
        install = subprocess.run(
            [apt, "install", "-y", "--no-install-recommends", "chromium"],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    found = shutil.which("chromium")
    if not found:
        pytest.fail(f"apt-get install chromium failed:\n{install.stdout[-2000:]}{install.stderr}")
    return found


@pytest.fixture(scope="session")
def chromium() -> str:
    return chromium_binary()


HEADLESS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars")
# no network: every request outside file:// fails
OFFLINE = ("--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", "--no-first-run")


@dataclass(frozen=True)
class Rendered:
    dom: str
    body: dict[str, str]  # data-* attributes the page's script set on <body>
    console: list[str]  # console messages Chromium logged
    screenshot: Path


def render(chromium: str, page: Path, screenshot: Path, height: int = 2400) -> Rendered:
    """Open ``page`` headless: dump the DOM after load, collect console lines, screenshot."""
    url = page.resolve().as_uri()
    common = [chromium, *HEADLESS, *OFFLINE, "--virtual-time-budget=5000"]
    dump = subprocess.run(
        [*common, "--enable-logging=stderr", "--v=0", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert dump.returncode == 0, dump.stderr[-3000:]
    console = [line for line in dump.stderr.splitlines() if ":CONSOLE" in line]
    match = re.search(r"<body([^>]*)>", dump.stdout)
    assert match, dump.stdout[:500]
    body = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', match.group(1)))
    shot = subprocess.run(
        [*common, f"--window-size=1280,{height}", f"--screenshot={screenshot}", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-3000:]
    return Rendered(dump.stdout, body, console, screenshot)


def assert_page_is_whole(rendered: Rendered, figures: int, subjects: list[str]) -> None:
    assert rendered.body.get("ready") == "1", rendered.body
    assert rendered.body["images-total"] == str(figures)
    assert rendered.body["images-loaded"] == str(figures), "a figure did not load"
    assert rendered.body["page-errors"] == "0", rendered.body.get("error-text")
    assert rendered.console == []
    text = re.sub(r"<[^>]+>", " ", rendered.dom)
    for sid in subjects:
        assert re.search(rf"(?<![\w-]){re.escape(sid)}(?![\w-])", text), sid
    from PIL import Image

    with Image.open(rendered.screenshot) as image:
        assert image.size == (1280, image.size[1])
        assert len(image.convert("L").getcolors(256 * 256) or []) > 20  # not a blank page


def test_browser_shows_a_whole_page(chromium: str, two_cohorts: Path, two_report: Path) -> None:
    rendered = render(chromium, two_report, two_report.parent / "screenshot.png")
    assert_page_is_whole(rendered, len(FIGURES_TWO_COHORTS), subject_ids(two_cohorts))


def test_browser_check_catches_a_broken_image(
    chromium: str, two_report: Path, tmp_path: Path
) -> None:
    page = two_report.read_text()
    broken = page.replace('src="data:image/png;base64,', 'src="data:image/png;base64,AAAA', 1)
    (tmp_path / "broken.html").write_text(broken)
    rendered = render(chromium, tmp_path / "broken.html", tmp_path / "shot.png", height=600)
    assert rendered.body["images-total"] == str(len(FIGURES_TWO_COHORTS))
    assert rendered.body["images-loaded"] == str(len(FIGURES_TWO_COHORTS) - 1)
    assert rendered.body["page-errors"] == "1"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_report_of_a_real_run_in_the_browser(
    ray_session: None, small_cohort: Path, tmp_path: Path, chromium: str
) -> None:
    out = tmp_path / "run"
    args = ["run", str(small_cohort), "--out", str(out), "--weights", "random"]
    args += ["--device", "cpu", "--quiet", "--stall-timeout", "240", "--bootstrap", "200"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    path = write_report(out)
    ids = [s.subject_id for s in read_manifest(small_cohort)]
    rendered = render(chromium, path, tmp_path / "screenshot.png")
    assert_page_is_whole(rendered, len(FIGURES_TWO_COHORTS), ids)
    page = path.read_text()
    assert "No subject failed." in page
    assert "features.denseblock4.denselayer16.conv2" in page  # provenance: hooked layers
    # the weights' description, where the page states it (the embedded config also says
    # "random", so a bare substring check could not fail)
    detail = json.loads((out / "run.json").read_text())["weights"]["detail"]
    assert detail == "torchvision init, seed 0"
    assert f"Weights: {html.escape(detail)}. Cohorts:" in page


# ------------------------------------------------------------ README examples

README = Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDER = 'results = "demo-results/results"'


def readme_examples() -> list[str]:
    """The ```python blocks of the README's "Query the results" section."""
    text = README.read_text()
    section = text[text.index("## Query the results") :]
    following = re.search(r"\n## ", section[3:])
    section = section[: following.start() + 3] if following else section
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_readme_has_query_examples_and_the_screenshot() -> None:
    blocks = readme_examples()
    assert len(blocks) == 2
    assert "duckdb" in blocks[0] and "pd.read_parquet" in blocks[1]
    assert all(block.startswith(PLACEHOLDER + "\n") for block in blocks)
    assert "](docs/report.png)" in README.read_text()
    image = README.parent / "docs" / "report.png"
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("index", [0, 1], ids=["duckdb", "pandas"])
def test_readme_query_examples_run(
    index: int, two_cohorts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    block = readme_examples()[index]
    code = block.replace(PLACEHOLDER, f"results = {str(two_cohorts)!r}", 1)
    exec(compile(code, f"README.md example {index + 1}", "exec"), {})
    printed = capsys.readouterr().out
    assert "control" in printed and "osteo" in printed
    if index == 0:
        assert "tibia-femur" in printed and "FileNotFoundError" in printed
    else:
        sha = json.loads((two_cohorts / "run.json").read_text())["weights"]["sha256"]
        assert re.fullmatch(r"[0-9a-f]{64}", sha)  # a real hash, not two empty strings
        assert f"weights sha256 {sha[:12]}... True" in printed  # run.json = Parquet metadata


def test_overlay_names_take_bare_region_names() -> None:
    """Runs on mask folders or Slicer segmentations name regions without values."""
    from cohort.report.sections import region_names

    run = {"config": {"regions": {"labels": [["liver", None], ["spleen", None]]}}}

    class Row:
        labels = None

    assert region_names(run, Row()) == (("liver", None), ("spleen", None))
    Row.labels = (("tibia", 2), ("femur", 1))  # type: ignore[assignment]
    assert region_names(run, Row()) == (("tibia", 2), ("femur", 1))
