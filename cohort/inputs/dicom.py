"""Read a folder holding a DICOM series as a float32 HU :class:`Volume`.

GDCM (through SimpleITK) reads the files: headers first, one
``ImageFileReader.ReadImageInformation`` per file, then the pixel data with
``ImageSeriesReader`` in the order decided here. GDCM decodes the transfer
syntax (JPEG 2000 included), applies each file's RescaleSlope/Intercept (HU,
per slice) and places the volume: origin at the first slice's
ImagePositionPatient, direction from ImageOrientationPatient and from the
first to the last position, slice spacing from the positions.

Series are told apart by the value of SeriesInstanceUID (0020,000E), read
from each file. GDCM's own series ids (``ImageSeriesReader.GetGDCMSeriesIDs``)
are that value too, with SeriesNumber, SequenceName, SliceThickness, Rows and
Columns appended when ``useSeriesDetails`` is on: an anonymised series whose
SeriesInstanceUID is present but empty has the id ``''`` (or ``'.3512512'``
with details: thickness 3, 512 x 512), which GDCM's ``GetGDCMSeriesFileNames``
takes to mean "no series chosen". Grouping by the tag value instead keeps a
``series_uid`` from a PACS meaningful, and an empty one is a series like any
other (shown as ``<empty>``).

The slices are checked to be one regular grid, and put in position order, by
:func:`cohort.inputs.slices.check_grid` (positions, never file names). A series
that is one multi-frame file (an Enhanced CT: one object per series, per-frame
positions in its functional groups) goes to :mod:`cohort.inputs.enhanced`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import SimpleITK as sitk  # noqa: N813 (the name SimpleITK's own documentation uses)

from cohort.config import PreprocessConfig
from cohort.errors import InputError
from cohort.inputs.itk import itk_error_reason
from cohort.inputs.slices import SliceHeader, check_grid
from cohort.inputs.volume import SeriesIdentity, Volume, volume_from_sitk

__all__ = ["DicomSeries", "list_dicom_series", "open_dicom_series", "read_dicom_series"]

_SERIES_UID = "0020|000e"
_SERIES_DESCRIPTION = "0008|103e"
_POSITION = "0020|0032"  # ImagePositionPatient
_ORIENTATION = "0020|0037"  # ImageOrientationPatient
_ROWS = "0028|0010"
_COLUMNS = "0028|0011"
_PIXEL_SPACING = "0028|0030"
_FRAMES = "0028|0008"  # NumberOfFrames
_GANTRY_TILT = "0018|1120"  # GantryDetectorTilt
_FRAME_OF_REFERENCE = "0020|0052"  # FrameOfReferenceUID

_MAX_VOXELS = PreprocessConfig.max_voxels


@dataclass(frozen=True)
class DicomSeries:
    """One series of a folder: its SeriesInstanceUID, description and files (name order)."""

    uid: str  # SeriesInstanceUID, "" when the files carry it empty
    description: str  # SeriesDescription, "" when absent
    files: tuple[Path, ...]

    def label(self) -> str:
        """``1.2.3 'CT Body 3.0' (20 slices)`` for messages."""
        uid = self.uid or "<empty>"
        text = f" {self.description!r}" if self.description else ""
        return f"{uid}{text} ({len(self.files)} slice{'s' if len(self.files) != 1 else ''})"


def list_dicom_series(folder: Path) -> tuple[DicomSeries, ...]:
    """The DICOM series of a folder (files directly in it), by SeriesInstanceUID.

    Files GDCM cannot read as DICOM images (a README, a DICOMDIR) are left out.
    """
    folder = _check_folder(folder)
    return tuple(_series(slices) for slices in _group(_scan(folder)[0]).values())


def read_dicom_series(
    folder: Path, series_uid: str | None = None, *, max_voxels: int = _MAX_VOXELS
) -> Volume:
    """Read one DICOM series of ``folder`` to a float32 HU :class:`Volume`.

    ``series_uid`` picks a series by SeriesInstanceUID; without it the folder
    must hold exactly one. The volume's ``(i, j, k)`` are (column, row, slice)
    with slices in increasing position along the slice normal.
    """
    return open_dicom_series(folder, series_uid, max_voxels=max_voxels)()


def open_dicom_series(
    folder: Path, series_uid: str | None = None, *, max_voxels: int = _MAX_VOXELS
) -> Callable[[], Volume]:
    """Read and check every header of one series now; the returned function reads
    the pixel data (see :func:`read_dicom_series`)."""
    folder = _check_folder(folder)
    slices, skipped = _scan(folder)
    groups = _group(slices)
    if not groups:
        raise InputError(
            f"folder {folder} holds no DICOM image files{_looked_at(folder, skipped)}; give "
            "the folder that holds the series' slice files"
        )
    listing = "; ".join(_series(group).label() for group in groups.values())
    if series_uid is None:
        if len(groups) > 1:
            raise InputError(
                f"folder {folder} holds {len(groups)} DICOM series: {listing}; say which one to "
                "read with the row's `series_uid` in the manifest, or move each series into "
                "a folder of its own"
            )
        chosen = next(iter(groups.values()))
    elif series_uid in groups:
        chosen = groups[series_uid]
    else:
        raise InputError(
            f"folder {folder} has no DICOM series with SeriesInstanceUID {series_uid!r}; "
            f"series there: {listing}; fix the row's `series_uid` in the manifest"
        )
    where = f"DICOM series {_series(chosen).label()} in {folder}"
    multi = [s for s in chosen if s.frames > 1]
    if multi:
        if len(chosen) > 1:
            raise InputError(
                f"{where}: file {multi[0].path.name} holds {multi[0].frames} frames (a "
                f"multi-frame object such as an Enhanced CT) beside {len(chosen) - 1} other "
                "file(s) of the same series; a multi-frame object is a whole volume: give its "
                "file as the image, or move it into a folder of its own"
            )
        from cohort.inputs.enhanced import open_enhanced  # highdicom only for multi-frame

        return open_enhanced(multi[0].path, max_voxels=max_voxels)
    ordered = check_grid(chosen, where, max_voxels)
    identity = SeriesIdentity(ordered[0].series_uid, ordered[0].frame_of_reference)

    def read() -> Volume:
        reader = sitk.ImageSeriesReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileNames([str(s.path) for s in ordered])
        reader.SetOutputPixelType(sitk.sitkFloat32)  # each file's rescale applied, no truncation
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise InputError(
                f"{where}: the headers are readable but the pixel data are not "
                f"({itk_error_reason(exc)}); a file may be truncated, or use a compression GDCM "
                "cannot decode: copy the series again, or convert it with dcm2niix"
            ) from None
        uid = ordered[0].series_uid or "<empty SeriesInstanceUID>"
        volume = volume_from_sitk(image, folder, f"DICOM series {uid} ({len(ordered)} slices)")
        return replace(volume, identity=identity)

    return read


def _check_folder(folder: Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(
            f"DICOM folder {folder} does not exist or is not a folder; fix the path in the manifest"
        )
    return folder


def _looked_at(folder: Path, skipped: Sequence[str]) -> str:
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
    parts = []
    if skipped:
        names = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        parts.append(f"{len(skipped)} file(s) that are not DICOM images: {names}")
    if subfolders:
        names = ", ".join(subfolders[:5]) + (", ..." if len(subfolders) > 5 else "")
        parts.append(f"subfolders (not searched): {names}")
    return f" (found {'; '.join(parts)})" if parts else " (it is empty)"


def _scan(folder: Path) -> tuple[list[SliceHeader], list[str]]:
    """Read the header of every file directly in ``folder``; (DICOM slices, other names)."""
    slices: list[SliceHeader] = []
    skipped: list[str] = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            skipped.append(path.name)
            continue
        slices.append(_slice(path, reader))
    return slices, skipped


def _slice(path: Path, reader: sitk.ImageFileReader) -> SliceHeader:
    def text(tag: str) -> str:
        return str(reader.GetMetaData(tag)).strip() if reader.HasMetaDataKey(tag) else ""

    def numbers(tag: str, count: int) -> tuple[float, ...] | None:
        try:
            values = tuple(float(v) for v in text(tag).split("\\"))
        except ValueError:
            return None
        return values if len(values) == count and all(map(math.isfinite, values)) else None

    def integer(tag: str) -> int | None:
        try:
            return int(text(tag))
        except ValueError:
            return None

    return SliceHeader(
        path=path,
        series_uid=text(_SERIES_UID),
        description=text(_SERIES_DESCRIPTION),
        rows=integer(_ROWS),
        columns=integer(_COLUMNS),
        position=numbers(_POSITION, 3),
        orientation=numbers(_ORIENTATION, 6),
        pixel_spacing=numbers(_PIXEL_SPACING, 2),
        frames=integer(_FRAMES) or 1,
        gantry_tilt=text(_GANTRY_TILT),
        frame_of_reference=text(_FRAME_OF_REFERENCE),
    )


def _group(slices: Sequence[SliceHeader]) -> dict[str, list[SliceHeader]]:
    """Slices by SeriesInstanceUID, series in UID order, files in name order."""
    groups: dict[str, list[SliceHeader]] = {}
    for s in slices:
        groups.setdefault(s.series_uid, []).append(s)
    return dict(sorted(groups.items()))


def _series(slices: Sequence[SliceHeader]) -> DicomSeries:
    described = [s.description for s in slices if s.description]
    return DicomSeries(
        uid=slices[0].series_uid,
        description=Counter(described).most_common(1)[0][0] if described else "",
        files=tuple(s.path for s in slices),
    )
