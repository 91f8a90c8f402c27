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

Slice order and spacing come from ImagePositionPatient projected on the slice
normal (the cross product of ImageOrientationPatient's row and column
directions), never from file names, InstanceNumber or SliceThickness. Before
any pixel is read the slices must be one regular grid: one size, one
orientation, one pixel spacing, orthogonal row and column directions, the
slices stacked along the normal (no gantry tilt) at one spacing (no missing
slice, no two at one position).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the name SimpleITK's own documentation uses)

from cohort.config import PreprocessConfig
from cohort.errors import GeometryError, InputError
from cohort.inputs.itk import itk_error_reason
from cohort.inputs.volume import Volume, volume_from_sitk

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

_MAX_VOXELS = PreprocessConfig.max_voxels
_UNIT_TOLERANCE = 1e-3  # ImageOrientationPatient: |length - 1| and |row . column| at most this
_SAME_TOLERANCE = 1e-3  # two slices' orientations / pixel spacings count as one up to this
_SPACING_TOLERANCE = 0.01  # a gap may differ from the slice spacing by this fraction of it
_TILT_TOLERANCE = 1e-3  # sideways drift of the positions, per mm along the normal (~0.06 deg)
_TILT_SLACK_MM = 1e-3  # ... plus this, for positions written with few decimals

_Numbers = tuple[float | int | None, ...] | None  # a header field as numbers


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


@dataclass(frozen=True)
class _Slice:
    """The header fields of one DICOM file that place it in a series and in space."""

    path: Path
    series_uid: str
    description: str
    rows: int | None
    columns: int | None
    position: tuple[float, ...] | None  # ImagePositionPatient, LPS mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row then column cosines
    pixel_spacing: tuple[float, ...] | None  # between rows, between columns (mm)
    frames: int
    gantry_tilt: str


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
    ordered = _check_grid(chosen, where, max_voxels)

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
        return volume_from_sitk(image, folder, f"DICOM series {uid} ({len(ordered)} slices)")

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


def _scan(folder: Path) -> tuple[list[_Slice], list[str]]:
    """Read the header of every file directly in ``folder``; (DICOM slices, other names)."""
    slices: list[_Slice] = []
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


def _slice(path: Path, reader: sitk.ImageFileReader) -> _Slice:
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

    return _Slice(
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
    )


def _group(slices: Sequence[_Slice]) -> dict[str, list[_Slice]]:
    """Slices by SeriesInstanceUID, series in UID order, files in name order."""
    groups: dict[str, list[_Slice]] = {}
    for s in slices:
        groups.setdefault(s.series_uid, []).append(s)
    return dict(sorted(groups.items()))


def _series(slices: Sequence[_Slice]) -> DicomSeries:
    described = [s.description for s in slices if s.description]
    return DicomSeries(
        uid=slices[0].series_uid,
        description=Counter(described).most_common(1)[0][0] if described else "",
        files=tuple(s.path for s in slices),
    )


def _check_grid(slices: Sequence[_Slice], where: str, max_voxels: int) -> list[_Slice]:
    """Check that the slices form one regular 3D grid; return them in position order."""
    for s in slices:
        missing = [
            name
            for name, value in (
                ("ImagePositionPatient", s.position),
                ("ImageOrientationPatient", s.orientation),
                ("PixelSpacing", s.pixel_spacing),
                ("Rows", s.rows),
                ("Columns", s.columns),
            )
            if value is None
        ]
        if missing:
            raise InputError(
                f"{where}: file {s.path.name} has no usable {', '.join(missing)}, so it cannot "
                "be placed in a volume (a localizer, a screenshot or a report?); remove it "
                "from the folder"
            )
        if s.frames > 1:
            raise InputError(
                f"{where}: file {s.path.name} holds {s.frames} frames (multi-frame DICOM), "
                "which cohort does not read; convert the series with dcm2niix and give the NIfTI"
            )
    _check_same(slices, where, "sizes (Rows x Columns)", lambda s: (s.rows, s.columns), _fmt_size)
    _check_same(
        slices, where, "orientations (ImageOrientationPatient)", lambda s: s.orientation, _fmt
    )
    _check_same(slices, where, "pixel spacings (PixelSpacing)", lambda s: s.pixel_spacing, _fmt)
    first = slices[0]
    rows, columns = int(first.rows or 0), int(first.columns or 0)
    count = rows * columns * len(slices)
    if count > max_voxels:
        raise InputError(
            f"{where} has {columns}x{rows}x{len(slices)} = {count:,} voxels, more than the "
            f"limit of {max_voxels:,}; crop or downsample it first, or raise the limit with "
            "--max-voxels"
        )
    if len(slices) < 2:
        raise GeometryError(
            f"{where} has one slice, a 2D image; cohort needs a 3D volume: give the folder "
            "that holds every slice of the series"
        )
    normal = _normal(first, where)
    positions = np.array([s.position for s in slices], dtype=np.float64)
    along = positions @ normal
    order = sorted(range(len(slices)), key=lambda n: (along[n], slices[n].path.name))
    ordered = [slices[n] for n in order]
    _check_spacing(ordered, along[order], where)
    _check_stacking(ordered, positions[order], normal, where)
    return ordered


def _check_same(
    slices: Sequence[_Slice],
    where: str,
    what: str,
    key: Callable[[_Slice], _Numbers],
    show: Callable[[_Numbers], str],
) -> None:
    """All slices share ``key(slice)`` (to :data:`_SAME_TOLERANCE`); the odd ones are named."""
    counts = Counter(tuple(np.round(np.asarray(key(s), dtype=np.float64), 4)) for s in slices)
    reference = np.asarray(counts.most_common(1)[0][0], dtype=np.float64)
    usual = [s for s in slices if np.max(np.abs(np.asarray(key(s)) - reference)) <= _SAME_TOLERANCE]
    if len(usual) == len(slices):
        return
    odd = [s for s in slices if s not in usual]
    raise GeometryError(
        f"{where} mixes slice {what}: {show(key(usual[0]))} in {len(usual)} file(s) (e.g. "
        f"{usual[0].path.name}), {show(key(odd[0]))} in {len(odd)} (e.g. {odd[0].path.name}); "
        "a series must be one volume: remove the odd files from the folder, or give them a "
        "series of their own"
    )


def _fmt(value: _Numbers) -> str:
    return "(" + ", ".join(f"{float(v or 0):g}" for v in value or ()) + ")"


def _fmt_size(value: _Numbers) -> str:
    return "x".join(str(v) for v in value or ())


def _normal(first: _Slice, where: str) -> np.ndarray:
    """The unit slice normal, row x column of ImageOrientationPatient, checked orthonormal."""
    cosines = np.asarray(first.orientation, dtype=np.float64)
    row, column = cosines[:3], cosines[3:]
    lengths = (float(np.linalg.norm(row)), float(np.linalg.norm(column)))
    dot = float(row @ column)
    if max(abs(lengths[0] - 1), abs(lengths[1] - 1), abs(dot)) > _UNIT_TOLERANCE:
        raise GeometryError(
            f"{where}: ImageOrientationPatient {_fmt(first.orientation)} (file "
            f"{first.path.name}) is not two orthogonal unit vectors (lengths {lengths[0]:.6g} "
            f"and {lengths[1]:.6g}, dot product {dot:.6g}), so the slices cannot be placed in "
            "space; export the series again from the scanner or PACS, or convert it with "
            "dcm2niix"
        )
    normal = np.cross(row / lengths[0], column / lengths[1])
    return np.asarray(normal / np.linalg.norm(normal), dtype=np.float64)


def _check_spacing(ordered: Sequence[_Slice], along: np.ndarray, where: str) -> None:
    """Consecutive positions along the normal are one spacing apart, none repeated."""
    gaps = np.diff(along)
    spacing = float(np.median(gaps))
    for n, gap in enumerate(gaps):
        a, b = ordered[n], ordered[n + 1]
        between = (
            f"from {along[n]:.6g} mm (file {a.path.name}) to {along[n + 1]:.6g} mm "
            f"(file {b.path.name})"
        )
        if gap <= _SPACING_TOLERANCE * spacing:
            raise GeometryError(
                f"{where}: two slices at one position along the slice normal, {along[n]:.6g} mm: "
                f"files {a.path.name} and {b.path.name}; the folder holds more than one volume "
                "(several acquisitions, echoes or time points, or a copied file): keep one "
                "volume's files in the folder"
            )
        if abs(gap - spacing) <= _SPACING_TOLERANCE * spacing:
            continue
        ratio = gap / spacing
        missing = round(ratio) - 1
        if missing >= 1 and abs(ratio - round(ratio)) <= 0.2:
            raise GeometryError(
                f"{where}: slice positions along the slice normal jump {between}, a gap of "
                f"{gap:.6g} mm where the other slices are {spacing:.6g} mm apart: "
                f"{'a missing slice' if missing == 1 else f'{missing} missing slices'}; copy "
                "the whole series again (every file) into the folder"
            )
        raise GeometryError(
            f"{where}: slices are not evenly spaced: positions along the slice normal go "
            f"{between}, a gap of {gap:.6g} mm where the other slices are {spacing:.6g} mm "
            "apart; cohort needs one slice spacing: resample the series to an even spacing "
            "(e.g. convert it with dcm2niix and resample the NIfTI), or remove the odd slice"
        )


def _check_stacking(
    ordered: Sequence[_Slice], positions: np.ndarray, normal: np.ndarray, where: str
) -> None:
    """The positions lie on one line along the normal: no gantry tilt, no sideways shift."""
    offsets = positions - positions[0]
    along = offsets @ normal
    sideways = np.linalg.norm(offsets - np.outer(along, normal), axis=1)
    allowed = _TILT_TOLERANCE * np.abs(along) + _TILT_SLACK_MM
    worst = int(np.argmax(sideways - allowed))
    if sideways[worst] <= allowed[worst]:
        return
    angle = math.degrees(math.atan2(float(sideways[worst]), abs(float(along[worst]))))
    tilt = ordered[0].gantry_tilt
    raise GeometryError(
        f"{where}: the slices are not stacked along the slice normal (the cross product "
        f"of ImageOrientationPatient's row and column directions): file "
        f"{ordered[worst].path.name} lies {sideways[worst]:.4g} mm sideways of the line "
        f"through file {ordered[0].path.name}, "
        f"{angle:.3g} degrees off the normal (GantryDetectorTilt "
        f"{tilt or 'not given'}): a tilted gantry or a sheared grid; resample the series "
        "to an orthogonal grid (dcm2niix corrects gantry tilt) and give the NIfTI"
    )
