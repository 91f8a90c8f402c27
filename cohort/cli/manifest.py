"""``cohort manifest``: write a manifest from a folder layout (:mod:`cohort.inputs.layout`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cohort.cli.common import reported
from cohort.errors import ExitCode

__all__ = ["manifest"]


@click.command("manifest")
@click.argument("root", type=click.Path(path_type=Path))
@click.option(
    "--image",
    "image_pattern",
    default=None,
    help="Pattern of the images under ROOT, with {subject} (and {cohort}), * and ? "
    "(e.g. '{subject}/ct.nii.gz', '{cohort}/{subject}/dicom'). Not with --match-by-uid.",
)
@click.option(
    "--mask",
    "mask_pattern",
    required=True,
    help="Pattern of the masks under ROOT (e.g. '{subject}/seg.nii.gz', '{subject}/masks').",
)
@click.option(
    "--match-by-uid",
    is_flag=True,
    help="Pair each DICOM SEG or RTSTRUCT that --mask finds with the image series it "
    "references (SeriesInstanceUID), among the DICOM files under ROOT; the row gets that "
    "series' folder and series_uid. Instead of --image.",
)
@click.option("--cohort", default=None, help="One cohort name for every subject.")
@click.option(
    "--cohort-table",
    type=click.Path(path_type=Path),
    default=None,
    help="CSV with columns subject_id,cohort.",
)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Manifest CSV.")
def manifest(
    root: Path,
    image_pattern: str | None,
    mask_pattern: str,
    match_by_uid: bool,
    cohort: str | None,
    cohort_table: Path | None,
    out: Path,
) -> None:
    """Write a manifest of the subjects under ROOT, found by path patterns.

    A subject needs an image and a mask; files or folders that match one pattern
    but not the other are listed (exit status 1, the manifest is still written).
    With --match-by-uid each DICOM SEG or RTSTRUCT found by --mask is paired with
    the image series it references, found among the DICOM files under ROOT.
    Symlinked folders are searched (a link back to a folder above it is not
    followed); folders that cannot be read are listed (exit status 1).
    """
    from cohort.inputs.layout import find_layout, read_cohort_table
    from cohort.inputs.manifest import write_manifest

    with reported():
        table = read_cohort_table(cohort_table) if cohort_table is not None else None
        layout = find_layout(
            root,
            image_pattern,
            mask_pattern,
            cohort=cohort,
            cohort_table=table,
            match_by_uid=match_by_uid,
        )
        write_manifest(layout.subjects, out)
    cohorts = sorted({s.cohort for s in layout.subjects})
    click.echo(
        f"{len(layout.subjects)} subjects ({', '.join(cohorts)}) -> {out}"
        + (f"; {layout.unmatched} unmatched" if layout.unmatched else "")
        + (f"; {layout.unreadable} folder(s) could not be read" if layout.unreadable else "")
    )
    for found in layout.images_without_mask:
        click.echo(f"image without mask: {found.path} (subject {found.subject})", err=True)
    for found in layout.masks_without_image:
        click.echo(f"mask without image: {found.path} (subject {found.subject})", err=True)
    for note in layout.notes:
        click.echo(f"  {note}", err=True)
    for skipped in layout.skipped:
        fix = "; subjects in it are missing: fix its permissions" if skipped.unreadable else ""
        click.echo(f"folder not searched: {skipped.path} {skipped.reason}{fix}", err=True)
    problems = layout.unmatched or layout.unreadable
    sys.exit(ExitCode.FAILURES if problems else ExitCode.OK)
