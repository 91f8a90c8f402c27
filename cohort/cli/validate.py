"""``cohort validate``: open and check every input of a manifest, without a model."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cohort.cli.common import reported
from cohort.config import RegionConfig, format_label_map
from cohort.errors import ExitCode, InputError

__all__ = ["validate"]


@click.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--labels", default=format_label_map(RegionConfig().labels), show_default=True)
def validate(manifest: Path, labels: str) -> None:
    """Check every input of MANIFEST without running a model."""
    from cohort.config import PreprocessConfig, parse_label_map
    from cohort.inputs.manifest import read_manifest
    from cohort.inputs.stages import Stages

    with reported():
        subjects = read_manifest(manifest)
        default_labels = parse_label_map(labels)
    cfg = PreprocessConfig()
    problems: list[tuple[str, str, str]] = []
    for subject in subjects:
        stages = Stages()
        try:
            stages.checked(subject.image, subject.mask, subject.labels or default_labels, cfg)
        except InputError as err:
            problems.append((subject.subject_id, stages.stage, str(err)))
        except Exception as err:
            problems.append((subject.subject_id, stages.stage, f"{type(err).__name__}: {err}"))
    click.echo(f"{len(subjects)} subjects, {len(problems)} with problems")
    for sid, stage, message in problems:
        click.echo(f"{sid}\t{stage}\t{message}")
    sys.exit(ExitCode.FAILURES if problems else ExitCode.OK)
