"""``cohort run`` (the main job) and ``cohort demo`` (the same on a synthetic cohort)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cohort.cli import options
from cohort.cli.common import fail
from cohort.config import RunConfig
from cohort.errors import CohortError, ExitCode

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["demo", "demo_findings", "execute", "format_origin", "run"]


def format_origin(origin: pd.DataFrame) -> str:
    """The origin study's table (region pairs x layers, cohort means), one block per cohort."""
    if origin.empty:
        return "(no similarities: no subject finished)"
    layers = [c for c in origin.columns if c not in ("cosine", "cohort", "pair")]
    kind = f" ({origin['cosine'].iloc[0]} cosines)" if "cosine" in origin else ""
    blocks = []
    for cohort, rows in origin.groupby("cohort", sort=False):
        width = max(len("pair"), *(len(str(p)) for p in rows["pair"]))
        header = f"{'pair':<{width}}  " + "  ".join(f"{layer:>8}" for layer in layers)
        lines = [f"cohort {cohort}{kind}", header]
        for _, row in rows.iterrows():
            values = "  ".join(f"{row[layer]:>8.4f}" for layer in layers)
            lines.append(f"{row['pair']:<{width}}  {values}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def execute(
    manifest: Path, out: Path, cfg: RunConfig, *, download: bool = True, report: bool = True
) -> ExitCode:
    """Run the pipeline, print its summary and write its report, holding ``out``'s lock
    (:mod:`cohort.outputs.lock`) throughout; returns the exit status."""
    from cohort.outputs.lock import hold

    try:
        with hold(out, ["cohort", "run", str(manifest), "--out", str(out)]):
            return _execute(manifest, out, cfg, download=download, report=report)
    except CohortError as err:  # the folder is in use, or cannot be made
        fail(err)


def _execute(
    manifest: Path, out: Path, cfg: RunConfig, *, download: bool, report: bool
) -> ExitCode:
    from cohort.execution import driver

    try:
        result = driver.run(manifest, out, cfg, download=download)
    except click.BadParameter as err:
        fail(err, ExitCode.UNUSABLE)
    except CohortError as err:
        fail(err)
    click.echo(f"weights: {result.weights}")
    if result.origin is not None:
        click.echo(format_origin(result.origin))
    click.echo(
        f"{result.done} done, {result.cached} reused, {result.failed} failed of "
        f"{result.subjects} subjects in {result.seconds:.1f} s -> {out}"
        + (f", {result.where()}" if result.where() else "")
    )
    for error in result.errors:
        click.echo(
            f"  failed {error['subject_id']} at {error['stage']}: {error['message']}", err=True
        )
    if report and (out / "run.json").is_file():
        from cohort.report import write_report

        try:
            click.echo(f"report: {write_report(out)}")
        except Exception as err:  # the results stand without their report
            click.echo(
                f"warning: the report could not be written ({err}); "
                f"run `cohort report {out}` to retry",
                err=True,
            )
    return result.exit_code


NO_REPORT = click.option(
    "--no-report", is_flag=True, help="Skip the HTML report (cohort report DIR makes it later)."
)


@click.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output folder (refused while another cohort command writes there).",
)
@options.apply(options.RUN_OPTIONS)
@NO_REPORT
def run(manifest: Path, out: Path, no_report: bool, **values: Any) -> None:
    """Extract region features for every subject in MANIFEST and test them."""
    cfg = options.run_config(values)
    sys.exit(execute(manifest, out, cfg, report=not no_report))


@click.command()
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("demo-results"), show_default=True
)
@click.option("--per-cohort", default=10, show_default=True, help="Subjects in each cohort.")
@click.option("--shape", default="96,128,128", show_default=True, help="Volume D,H,W voxels.")
@click.option("--seed", default=0, show_default=True)
@NO_REPORT
def demo(out: Path, per_cohort: int, shape: str, seed: int, no_report: bool) -> None:
    """Make a synthetic two-cohort knee-CT set under OUT and analyse it."""
    from cohort.model.network import imagenet_available
    from cohort.synthetic import make_phantom_cohort

    try:
        d, h, w = (int(x) for x in shape.split(","))
    except ValueError:
        raise click.BadParameter(f"--shape must be D,H,W integers, got {shape!r}") from None
    click.echo(f"making {2 * per_cohort} phantom knee CTs ({d}x{h}x{w}) in {out / 'data'}")
    manifest = make_phantom_cohort(
        out / "data", n_per_cohort=per_cohort, shape=(d, h, w), seed=seed
    )
    pretrained = imagenet_available("densenet121")
    if pretrained:
        click.echo("weights: torchvision ImageNet DenseNet121 (found in torchvision's cache)")
    else:
        click.echo(
            "weights: seeded random (ImageNet weights are not in torchvision's cache; the "
            "numbers show the pipeline, not pretrained knowledge)"
        )
    values = options.defaults(options.RUN_OPTIONS)
    values["weights"] = "imagenet" if pretrained else "random"
    cfg = options.run_config(values)
    code = execute(manifest, out / "results", cfg, download=False, report=not no_report)
    if (out / "results" / "stats.parquet").is_file():
        click.echo(demo_findings(out / "results", cfg.stats.alpha))
    sys.exit(code)


def demo_findings(folder: Path, alpha: float, most: int = 4) -> str:
    """What the demo's between-cohort tests found, strongest first, and where to look."""
    import pandas as pd

    tests = pd.read_parquet(folder / "stats.parquet")
    between = tests[tests["family"].str.startswith("between") & (tests["status"] == "ok")]
    found = between[between["q_value"] < alpha].sort_values(["q_value", "p_value"])
    report = folder / "report" / "report.html"
    if found.empty:
        return f"no between-cohort test reached q < {alpha:g}; the tests are in {report}#stats"
    lines = [f"between the cohorts, {len(found)} test(s) with q < {alpha:g}, strongest first:"]
    for row in found.head(most).itertuples():
        lines.append(
            f"  {row.layer} {row.pair}: {row.test} q = {row.q_value:.2g}, "
            f"{row.effect_name} {row.effect_size:+.2f}"
        )
    layer = str(found.iloc[0]["layer"])
    lines.append(
        f"see {report}#distributions (figure cosines_{layer}: each subject's cosines per "
        "cohort) and #stats (every test, sortable)"
    )
    return "\n".join(lines)
