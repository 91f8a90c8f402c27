"""Slices (or frames) of one DICOM volume checked to be one regular 3D grid.

A :class:`SliceHeader` holds what places one 2D image in space: a slice file of
a classic series (:mod:`cohort.inputs.dicom`) or one frame of a multi-frame
object such as an Enhanced CT (:mod:`cohort.inputs.enhanced`). :func:`check_grid`
puts them in position order and refuses, naming the slice or frame and the fix,
what is not one volume.

Slice order and spacing come from ImagePositionPatient projected on the slice
normal (the cross product of ImageOrientationPatient's row and column
directions), never from file names, frame order, InstanceNumber or
SliceThickness. The slices must be one regular grid: one size, one orientation,
one pixel spacing, orthogonal row and column directions, the slices stacked
along the normal (no gantry tilt) at one spacing (no missing slice, no two at
one position).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cohort.errors import GeometryError, InputError

__all__ = ["SliceHeader", "check_grid"]

_UNIT_TOLERANCE = 1e-3  # ImageOrientationPatient: |length - 1| and |row . column| at most this
_SAME_TOLERANCE = 1e-3  # two slices' orientations / pixel spacings count as one up to this
_SPACING_TOLERANCE = 0.01  # a gap may differ from the slice spacing by this fraction of it
_TILT_TOLERANCE = 1e-3  # sideways drift of the positions, per mm along the normal (~0.06 deg)
_TILT_SLACK_MM = 1e-3  # ... plus this, for positions written with few decimals
_FRAMES_FIX = (
    "export the series again from the scanner or PACS, or convert it with dcm2niix and "
    "give the NIfTI"
)

_Numbers = tuple[float | int | None, ...] | None  # a header field as numbers


@dataclass(frozen=True)
class SliceHeader:
    """The header fields that place one slice file, or one frame of a multi-frame file,
    in a series and in space."""

    path: Path
    series_uid: str
    description: str
    rows: int | None
    columns: int | None
    position: tuple[float, ...] | None  # ImagePositionPatient, LPS mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row then column cosines
    pixel_spacing: tuple[float, ...] | None  # between rows, between columns (mm)
    frames: int  # NumberOfFrames of the file (1 for a single-frame file)
    gantry_tilt: str
    frame_of_reference: str = ""  # FrameOfReferenceUID, "" when absent or empty
    frame: int | None = None  # 1-based frame number within a multi-frame file

    @property
    def short(self) -> str:
        """``CT.1.2.dcm`` or ``frame 3 of ct.dcm``."""
        return self.path.name if self.frame is None else f"frame {self.frame} of {self.path.name}"

    @property
    def label(self) -> str:
        """``file CT.1.2.dcm`` or ``frame 3 of file ct.dcm``."""
        return (
            f"file {self.path.name}"
            if self.frame is None
            else f"frame {self.frame} of file {self.path.name}"
        )


def _remedy(s: SliceHeader, for_files: str) -> str:
    """The fix for a series of files, or for the frames of one multi-frame file."""
    if s.frame is None:
        return for_files
    return ("; " if for_files.startswith(" ") else "") + _FRAMES_FIX


def _unit(s: SliceHeader) -> str:
    return "file(s)" if s.frame is None else "frame(s)"


def check_grid(slices: Sequence[SliceHeader], where: str, max_voxels: int) -> list[SliceHeader]:
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
                f"{where}: {s.label} has no usable {', '.join(missing)}, so it cannot "
                "be placed in a volume"
                + _remedy(s, " (a localizer, a screenshot or a report?); remove it from the folder")
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
            f"{where} has one slice, a 2D image; cohort needs a 3D volume: "
            + _remedy(first, "give the folder that holds every slice of the series")
        )
    normal = _normal(first, where)
    positions = np.array([s.position for s in slices], dtype=np.float64)
    along = positions @ normal
    order = sorted(range(len(slices)), key=lambda n: (along[n], slices[n].label))
    ordered = [slices[n] for n in order]
    _check_spacing(ordered, along[order], where)
    _check_stacking(ordered, positions[order], normal, where)
    return ordered


def _check_same(
    slices: Sequence[SliceHeader],
    where: str,
    what: str,
    key: Callable[[SliceHeader], _Numbers],
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
        f"{where} mixes slice {what}: {show(key(usual[0]))} in {len(usual)} "
        f"{_unit(usual[0])} (e.g. {usual[0].short}), {show(key(odd[0]))} in {len(odd)} "
        f"(e.g. {odd[0].short}); "
        "a series must be one volume: "
        + _remedy(
            odd[0], "remove the odd files from the folder, or give them a series of their own"
        )
    )


def _fmt(value: _Numbers) -> str:
    return "(" + ", ".join(f"{float(v or 0):g}" for v in value or ()) + ")"


def _fmt_size(value: _Numbers) -> str:
    return "x".join(str(v) for v in value or ())


def _normal(first: SliceHeader, where: str) -> np.ndarray:
    """The unit slice normal, row x column of ImageOrientationPatient, checked orthonormal."""
    cosines = np.asarray(first.orientation, dtype=np.float64)
    row, column = cosines[:3], cosines[3:]
    lengths = (float(np.linalg.norm(row)), float(np.linalg.norm(column)))
    dot = float(row @ column)
    if max(abs(lengths[0] - 1), abs(lengths[1] - 1), abs(dot)) > _UNIT_TOLERANCE:
        raise GeometryError(
            f"{where}: ImageOrientationPatient {_fmt(first.orientation)} ("
            f"{first.label}) is not two orthogonal unit vectors (lengths {lengths[0]:.6g} "
            f"and {lengths[1]:.6g}, dot product {dot:.6g}), so the slices cannot be placed in "
            "space; export the series again from the scanner or PACS, or convert it with "
            "dcm2niix"
        )
    normal = np.cross(row / lengths[0], column / lengths[1])
    return np.asarray(normal / np.linalg.norm(normal), dtype=np.float64)


def _check_spacing(ordered: Sequence[SliceHeader], along: np.ndarray, where: str) -> None:
    """Consecutive positions along the normal are one spacing apart, none repeated."""
    gaps = np.diff(along)
    spacing = float(np.median(gaps))
    for n, gap in enumerate(gaps):
        a, b = ordered[n], ordered[n + 1]
        between = f"from {along[n]:.6g} mm ({a.label}) to {along[n + 1]:.6g} mm ({b.label})"
        if gap <= _SPACING_TOLERANCE * spacing:
            raise GeometryError(
                f"{where}: two slices at one position along the slice normal, {along[n]:.6g} mm: "
                f"{a.label} and {b.label}; more than one volume (several acquisitions, "
                "echoes or time points, or a copied file): "
                + _remedy(a, "keep one volume's files in the folder")
            )
        if abs(gap - spacing) <= _SPACING_TOLERANCE * spacing:
            continue
        ratio = gap / spacing
        missing = round(ratio) - 1
        if missing >= 1 and abs(ratio - round(ratio)) <= 0.2:
            raise GeometryError(
                f"{where}: slice positions along the slice normal jump {between}, a gap of "
                f"{gap:.6g} mm where the other slices are {spacing:.6g} mm apart: "
                f"{'a missing slice' if missing == 1 else f'{missing} missing slices'}; "
                + _remedy(a, "copy the whole series again (every file) into the folder")
            )
        raise GeometryError(
            f"{where}: slices are not evenly spaced: positions along the slice normal go "
            f"{between}, a gap of {gap:.6g} mm where the other slices are {spacing:.6g} mm "
            "apart; cohort needs one slice spacing: resample the series to an even spacing "
            "(e.g. convert it with dcm2niix and resample the NIfTI), or remove the odd slice"
        )


def _check_stacking(
    ordered: Sequence[SliceHeader], positions: np.ndarray, normal: np.ndarray, where: str
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
        f"of ImageOrientationPatient's row and column directions): "
        f"{ordered[worst].label} lies {sideways[worst]:.4g} mm sideways of the line "
        f"through {ordered[0].label}, "
        f"{angle:.3g} degrees off the normal (GantryDetectorTilt "
        f"{tilt or 'not given'}): a tilted gantry or a sheared grid; resample the series "
        "to an orthogonal grid (dcm2niix corrects gantry tilt) and give the NIfTI"
    )
