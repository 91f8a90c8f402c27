"""``cohort demo``: a synthetic cohort, analysed by ``cohort run`` or ``cohort robustness``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cohort.cli import options
from cohort.cli.robustness import execute_robustness
from cohort.cli.run import NO_REPORT, execute

__all__ = ["confounding_findings", "demo", "demo_findings"]


@click.command()
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("demo-results"), show_default=True
)
@click.option("--per-cohort", default=10, show_default=True, help="Subjects in each cohort.")
@click.option("--shape", default="96,128,128", show_default=True, help="Volume D,H,W voxels.")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--robustness",
    is_flag=True,
    help="Run cohort robustness on the phantoms (10 perturbations each, the default chain) "
    "and show the ICC table.",
)
@click.option(
    "--confounded",
    is_flag=True,
    help="Age drives both cohort membership and the bones (the cohort itself changes "
    "nothing): the analysis runs with --covariates age and compares the unadjusted and the "
    "adjusted between-cohort tests.",
)
@NO_REPORT
def demo(
    out: Path,
    per_cohort: int,
    shape: str,
    seed: int,
    robustness: bool,
    confounded: bool,
    no_report: bool,
) -> None:
    """Make a synthetic two-cohort knee-CT set under OUT and analyse it."""
    from cohort.model.network import imagenet_available
    from cohort.synthetic import make_confounded_cohort, make_phantom_cohort

    try:
        d, h, w = (int(x) for x in shape.split(","))
    except ValueError:
        raise click.BadParameter(f"--shape must be D,H,W integers, got {shape!r}") from None
    kind = " (age drives cohort and bones)" if confounded else ""
    click.echo(f"making {2 * per_cohort} phantom knee CTs ({d}x{h}x{w}){kind} in {out / 'data'}")
    make = make_confounded_cohort if confounded else make_phantom_cohort
    manifest = make(out / "data", n_per_cohort=per_cohort, shape=(d, h, w), seed=seed)
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
    if confounded:
        values["covariates"] = "age"
    cfg = options.run_config(values)
    if robustness:
        from cohort.inputs.chain_config import RobustnessConfig

        code = execute_robustness(
            manifest, out / "results", cfg, RobustnessConfig(), download=False, report=not no_report
        )
    else:
        code = execute(manifest, out / "results", cfg, download=False, report=not no_report)
    if (out / "results" / "stats.parquet").is_file():
        click.echo(demo_findings(out / "results", cfg.stats.alpha))
        if confounded:
            click.echo(confounding_findings(out / "results", cfg.stats.alpha))
    sys.exit(code)


def confounding_findings(folder: Path, alpha: float) -> str:
    """How many cosines the unadjusted and the age-adjusted tests find different."""
    import pandas as pd

    tests = pd.read_parquet(folder / "stats.parquet")
    ran = tests[tests["status"] == "ok"]
    plain = ran[ran["family"] == "between-pairs"]
    adjusted = ran[ran["family"] == "between-pairs-adjusted"]
    n_plain = int((plain["q_value"] < alpha).sum())
    n_adjusted = int((adjusted["q_value"] < alpha).sum())
    lines = [
        f"unadjusted (Mann-Whitney): {n_plain} of {len(plain)} cosine tests find the cohorts "
        f"different (q < {alpha:g})",
        f"adjusted for age (Freedman-Lane): {n_adjusted} of {len(adjusted)} do",
    ]
    if n_plain > 0 and n_adjusted == 0:
        lines.append(
            "age drives both cohort membership and the bones here, so the unadjusted "
            "'difference' is age: adjusted for it, the cohorts do not differ"
        )
    elif n_plain == 0:
        lines.append("the unadjusted tests found no difference to explain in this run")
    else:
        lines.append(
            "some adjusted tests still differ: the age effect is not linear in every cosine, "
            "or the cohorts differ beyond age; see the report's adjusted section"
        )
    lines.append(f"see {folder / 'report' / 'report.html'}#adjusted")
    return "\n".join(lines)


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
