"""``cohort validate``: open and check every input of a manifest, without the run's weights."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from cohort.cli import options
from cohort.cli.common import reported
from cohort.errors import ExitCode, InputError

__all__ = ["validate"]


@click.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@options.LABELS
@options.BACKGROUND
@options.BACKBONE
@options.LAYERS
@options.apply(options.PREPROCESS_OPTIONS)
@options.apply(options.ADJUST_OPTIONS)
def validate(
    manifest: Path, labels: str, background: bool, backbone: str, layers: str, **values: Any
) -> None:
    """Check every input of MANIFEST as `cohort run` would, without running the model.

    Takes the options of `cohort run` that decide whether a subject can be used
    (the backbone and its preprocessing preset, --spacing, --crop-margin,
    --mask-resample, --max-voxels, --labels, --layers) and checks each subject
    with them: loaded (any image and mask kind `cohort run` reads), grids in
    RAS+, regions present, finite image, and the model input (after cropping and
    resampling) large enough for every hooked layer. The network is built from
    its architecture alone, with random weights: no weights file is read or
    downloaded. The columns --covariates, --strata and --harmonise name are
    allowed in the manifest and checked as `cohort run` checks them. After the
    problems, one line per subject that loaded: the image kind (DICOM series,
    Enhanced CT, file), the mask kind (DICOM SEG, RTSTRUCT, label-map file, mask
    folder, 3D Slicer segmentation), the segments, ROIs, files or values it
    holds, and those the labels use.
    """
    from cohort.config import ModelConfig, parse_label_map
    from cohort.execution.adjust import check_run, manifest_extras
    from cohort.execution.plan import network_reach
    from cohort.inputs.manifest import read_manifest
    from cohort.inputs.stages import Stages
    from cohort.inputs.summary import summarise

    adjusted = options.adjust_config(values)
    cfg = options.preprocess_config({**values, "backbone": backbone})
    with reported():
        subjects = read_manifest(manifest, manifest_extras(adjusted))
        check_run(subjects, manifest, adjusted)
        default_labels = parse_label_map(labels)
        hooked = options.layer_specs(layers)
        reach = network_reach(ModelConfig(backbone=backbone, weights="random", layers=hooked))
    problems: list[tuple[str, str, str]] = []
    inputs: list[tuple[str, str]] = []
    for subject in subjects:
        labels_used = subject.labels or default_labels
        stages = Stages(labels_used, cfg, reach)
        try:
            pair = stages.loaded(subject.image, subject.mask, subject.series_uid)
            inputs.append((subject.subject_id, summarise(pair, labels_used).line()))
            stages.place(stages.check(pair), background)
        except InputError as err:
            problems.append((subject.subject_id, stages.stage, str(err)))
        except Exception as err:
            problems.append((subject.subject_id, stages.stage, f"{type(err).__name__}: {err}"))
    click.echo(f"{len(subjects)} subjects, {len(problems)} with problems")
    for sid, stage, message in problems:
        click.echo(f"{sid}\t{stage}\t{message}")
    for sid, line in inputs:
        click.echo(f"{sid}\tinputs\t{line}")
    sys.exit(ExitCode.FAILURES if problems else ExitCode.OK)
