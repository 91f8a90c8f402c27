"""The ``cohort`` command: one thin function per subcommand.

Exit status: 0 every subject done; 1 failures recorded (partial results
written); 2 unusable invocation, manifest or weights; 130 interrupted (finished
subjects kept; rerun the same command to continue).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import click
import pandas as pd

from cohort import options
from cohort.config import RunConfig
from cohort.errors import CohortError, ConfigError, InputError, ManifestError, ModelError
from cohort.inputs.manifest import read_manifest

EXIT_OK, EXIT_FAILURES, EXIT_UNUSABLE = 0, 1, 2
EXIT_INTERRUPTED = 130  # Ctrl-C: finished subjects are kept, rerun to continue


def format_origin(origin: pd.DataFrame) -> str:
    """The origin study's table (region pairs x layers, cohort means), one block per cohort."""
    if origin.empty:
        return "(no similarities: no subject finished)"
    layers = [c for c in origin.columns if c not in ("cohort", "pair", "n")]
    blocks = []
    for cohort, rows in origin.groupby("cohort", sort=False):
        width = max(len("pair"), *(len(str(p)) for p in rows["pair"]))
        header = f"{'pair':<{width}}  " + "  ".join(f"{layer:>8}" for layer in layers)
        lines = [
            f"cohort {cohort}" + (f" (n = {rows['n'].iloc[0]})" if "n" in rows else ""),
            header,
        ]
        for _, row in rows.iterrows():
            values = "  ".join(f"{row[layer]:>8.4f}" for layer in layers)
            lines.append(f"{row['pair']:<{width}}  {values}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _fail(err: Exception, code: int = EXIT_UNUSABLE) -> None:
    click.echo(f"error: {err}", err=True)
    sys.exit(code)


@click.group()
@click.version_option(package_name="cohort")
def main() -> None:
    """Deep region features and defensible statistics for CT cohorts."""


def execute(
    manifest: Path, out: Path, cfg: RunConfig, *, download: bool = True, report: bool = True
) -> int:
    """Run the pipeline, print its summary and write its report; returns the exit status."""
    from cohort.execution import pipeline

    try:
        result = pipeline.run(manifest, out, cfg, download=download)
    except (ManifestError, ModelError, ConfigError, click.BadParameter) as err:
        _fail(err)
        raise AssertionError("unreachable") from None
    except pipeline.InterruptedRunError as err:
        _fail(err, EXIT_INTERRUPTED)
        raise AssertionError("unreachable") from None
    except CohortError as err:
        _fail(err, EXIT_FAILURES)
        raise AssertionError("unreachable") from None
    click.echo(f"weights: {result.weights}")
    if result.origin is not None:
        click.echo(format_origin(result.origin))
    click.echo(
        f"{result.done} done, {result.cached} reused, {result.failed} failed of "
        f"{result.subjects} subjects in {result.seconds:.1f} s -> {out}"
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


@main.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@options.apply(options.RUN_OPTIONS)
@NO_REPORT
def run(manifest: Path, out: Path, no_report: bool, **values: Any) -> None:
    """Extract region features for every subject in MANIFEST and test them."""
    cfg = options.run_config(values)
    sys.exit(execute(manifest, out, cfg, report=not no_report))


@main.command()
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
    values = _defaults(options.RUN_OPTIONS)
    values["weights"] = "imagenet" if pretrained else "random"
    cfg = options.run_config(values)
    sys.exit(execute(manifest, out / "results", cfg, download=False, report=not no_report))


def _defaults(opts: list[Any]) -> dict[str, Any]:
    """The default value of every option in ``opts``, keyed like click passes them."""

    @click.command()
    @options.apply(opts)
    def probe(**values: Any) -> dict[str, Any]:
        return values

    return dict(probe.main([], standalone_mode=False))


@main.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--labels", default="tibia=1,femur=2", show_default=True)
def validate(manifest: Path, labels: str) -> None:
    """Check every input of MANIFEST without running a model."""
    from cohort.config import PreprocessConfig, parse_label_map
    from cohort.inputs.geometry import check_pair
    from cohort.inputs.readers import load_pair

    try:
        subjects = read_manifest(manifest)
        default_labels = parse_label_map(labels)
    except (ManifestError, CohortError) as err:
        _fail(err)
        return
    cfg = PreprocessConfig()
    problems: list[tuple[str, str, str]] = []
    for subject in subjects:
        stage = "load"
        try:
            pair = load_pair(subject.image, subject.mask, cfg)
            stage = "check"
            check_pair(pair, subject.labels or default_labels, cfg)
        except InputError as err:
            problems.append((subject.subject_id, stage, str(err)))
        except Exception as err:
            problems.append((subject.subject_id, stage, f"{type(err).__name__}: {err}"))
    click.echo(f"{len(subjects)} subjects, {len(problems)} with problems")
    for sid, stage, message in problems:
        click.echo(f"{sid}\t{stage}\t{message}")
    sys.exit(EXIT_FAILURES if problems else EXIT_OK)


@main.command("stats")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@options.apply(options.STATS_OPTIONS)
def stats_command(folder: Path, **values: Any) -> None:
    """Recompute stats.parquet/csv and similarity.csv of a finished run in FOLDER."""
    from cohort.config import StatsConfig
    from cohort.execution.pipeline import write_summaries

    run_json = folder / "run.json"
    if not run_json.is_file():
        _fail(CohortError(f"{run_json} is missing; FOLDER must be the --out of a finished run"))
    provenance = json.loads(run_json.read_text())
    stats_cfg = options.stats_config(values)
    saved = provenance["config"]
    saved["stats"] = {**saved.get("stats", {}), **dataclasses.asdict(stats_cfg)}
    cfg = RunConfig(stats=StatsConfig(**saved["stats"]))
    origin = write_summaries(folder, cfg, provenance)
    click.echo(format_origin(origin))


from cohort.report import report  # noqa: E402

main.add_command(report)


from cohort.execution.submit import logs, status, stop, submit  # noqa: E402

main.add_command(submit)
main.add_command(status)
main.add_command(logs)
main.add_command(stop)
