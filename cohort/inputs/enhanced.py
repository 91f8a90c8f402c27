"""Read a multi-frame CT object (Enhanced CT: one file per series) as a float32 HU :class:`Volume`.

The header is read with pydicom (no pixel data): each frame's
ImagePositionPatient, ImageOrientationPatient and PixelSpacing come from its
per-frame functional groups, or from the shared ones. The frames get the checks
of a classic series (:func:`cohort.inputs.slices.check_grid`: one size,
orientation and pixel spacing, orthogonal directions, stacked along the normal,
evenly spaced, no frame missing or repeated), by position, never by frame
order. The voxels are then read with highdicom's volume API
(``Image.get_volume``), which sorts the frames spatially and applies each
frame's own RescaleSlope/RescaleIntercept (Pixel Value Transformation, per frame
where present, else shared): HU. The grid highdicom builds is compared with the
one the checks found, and the slices are put in increasing position along the
slice normal, as for a classic series.

SimpleITK/GDCM (2.5) is not used for these files: it takes the frames in stored
order (spacing and direction from the first two frames) and one rescale for all
frames, so frames stored out of order or with their own rescale come out wrong
(``tests/test_enhanced.py`` shows both).

Other multi-frame objects (an Enhanced MR, a multi-frame secondary capture) are
refused, naming what they are and how to convert them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from cohort.config import PreprocessConfig
from cohort.errors import GeometryError, InputError
from cohort.inputs.slices import SliceHeader, check_grid
from cohort.inputs.volume import (
    LPS_TO_RAS,
    SeriesIdentity,
    Volume,
    fmt_affine,
    from_slice_row_column,
)

__all__ = ["ENHANCED_CT", "open_enhanced", "read_enhanced"]

ENHANCED_CT = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
_MAX_VOXELS = PreprocessConfig.max_voxels
_AGREE_MM = 1e-3  # highdicom's grid and the checked one agree to this (mm)


def read_enhanced(path: Path, *, max_voxels: int = _MAX_VOXELS) -> Volume:
    """Read an Enhanced CT file to a float32 HU :class:`Volume`, ``(i, j, k)`` =
    (column, row, frame position along the slice normal, increasing)."""
    return open_enhanced(path, max_voxels=max_voxels)()


def open_enhanced(path: Path, *, max_voxels: int = _MAX_VOXELS) -> Callable[[], Volume]:
    """Read and check the header and every frame's position now; the returned function
    reads the pixel data (see :func:`read_enhanced`)."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError) as exc:
        raise InputError(
            f"image {path} is not a readable DICOM file ({exc}); give a DICOM series folder, an "
            "Enhanced CT file, or a NIfTI/NRRD/MetaImage file"
        ) from None
    sop = str(ds.get("SOPClassUID", ""))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if sop not in ENHANCED_CT:
        name = pydicom.uid.UID(sop).name if sop else "object without a SOPClassUID"
        raise InputError(
            f"image {path} is a DICOM {name} ({sop or 'no SOPClassUID'}, {frames} frame(s), "
            f"Modality {ds.get('Modality', 'not given')}), which cohort does not read as a CT "
            "volume: it reads CT series (one file per slice, in a folder) and multi-frame "
            f"{' or '.join(ENHANCED_CT.values())} files; convert it with dcm2niix and give the "
            "NIfTI"
        )
    uid = str(ds.get("SeriesInstanceUID", ""))
    where = f"Enhanced CT {path} (series {uid or '<empty>'}, {frames} frames)"
    headers = [_frame_header(ds, path, n, frames) for n in range(frames)]
    ordered = check_grid(headers, where, max_voxels)
    expected = _checked_affine(ordered)
    identity = SeriesIdentity(uid, str(ds.get("FrameOfReferenceUID", "")))

    def read() -> Volume:
        import highdicom as hd  # only for multi-frame objects (about 1.5 s to import)

        try:
            volume = hd.imread(str(path)).get_volume(
                dtype=np.float32,
                apply_real_world_transform=False,  # HU from the rescale, as for a classic series
                apply_modality_transform=None,  # each frame's rescale, where present
                apply_voi_transform=False,
                apply_presentation_lut=False,
                apply_palette_color_lut=False,
                apply_icc_profile=False,
            )
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            raise InputError(
                f"{where}: the header is readable but highdicom cannot read the frames as a "
                f"volume ({exc}); the pixel data may be truncated or in a compression pydicom "
                "cannot decode: export the series again, or convert it with dcm2niix"
            ) from None
        data, affine = from_slice_row_column(volume.array, volume.affine)
        if affine[:3, 2] @ expected[:3, 2] < 0:  # highdicom stacked the other way
            data = data[:, :, ::-1]
            affine[:3, 3] += affine[:3, 2] * (data.shape[2] - 1)
            affine[:3, 2] *= -1
        difference = float(np.max(np.abs(affine[:3] - expected[:3])))
        if data.shape[2] != len(ordered) or not difference <= _AGREE_MM:
            raise GeometryError(
                f"{where}: highdicom places the frames on {fmt_affine(affine)} "
                f"({data.shape[2]} slices), the frame positions give {fmt_affine(expected)} "
                f"({len(ordered)} slices); convert the file with dcm2niix and give the NIfTI"
            )
        return Volume(
            data=np.ascontiguousarray(data),
            affine=expected,
            path=path,
            description=f"Enhanced CT {uid or '<empty SeriesInstanceUID>'} ({frames} frames)",
            identity=identity,
        )

    return read


def _group_item(ds: pydicom.Dataset, index: int, sequence: str) -> Any:
    """The first item of a functional group: the frame's own, else the shared one."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    for groups in (per_frame[index : index + 1], shared[:1]):
        for item in groups:
            if sequence in item and len(item[sequence].value):
                return item[sequence].value[0]
    return None


def _numbers(item: Any, keyword: str, count: int) -> tuple[float, ...] | None:
    if item is None or keyword not in item:
        return None
    try:
        values = tuple(float(v) for v in item[keyword].value)
    except (TypeError, ValueError):
        return None
    return values if len(values) == count and all(np.isfinite(values)) else None


def _frame_header(ds: pydicom.Dataset, path: Path, index: int, frames: int) -> SliceHeader:
    """Frame ``index`` (0-based) placed by its functional groups."""
    acquisition = _group_item(ds, index, "CTAcquisitionDetailsSequence")
    tilt = acquisition.get("GantryDetectorTilt", "") if acquisition is not None else ""
    return SliceHeader(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        description=str(ds.get("SeriesDescription", "")),
        rows=int(ds.Rows) if "Rows" in ds else None,
        columns=int(ds.Columns) if "Columns" in ds else None,
        position=_numbers(
            _group_item(ds, index, "PlanePositionSequence"), "ImagePositionPatient", 3
        ),
        orientation=_numbers(
            _group_item(ds, index, "PlaneOrientationSequence"), "ImageOrientationPatient", 6
        ),
        pixel_spacing=_numbers(_group_item(ds, index, "PixelMeasuresSequence"), "PixelSpacing", 2),
        frames=frames,
        gantry_tilt=str(tilt or ds.get("GantryDetectorTilt", "")),
        frame_of_reference=str(ds.get("FrameOfReferenceUID", "")),
        frame=index + 1,
    )


def _checked_affine(ordered: list[SliceHeader]) -> np.ndarray:
    """(column, row, slice, 1) -> RAS mm of frames in position order (DICOM's formula)."""
    cosines = np.asarray(ordered[0].orientation, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in ordered[0].pixel_spacing or (0.0, 0.0))
    first = np.asarray(ordered[0].position, dtype=np.float64)
    last = np.asarray(ordered[-1].position, dtype=np.float64)
    lps = np.eye(4)
    lps[:3, 0] = cosines[:3] * column_spacing
    lps[:3, 1] = cosines[3:] * row_spacing
    lps[:3, 2] = (last - first) / (len(ordered) - 1)
    lps[:3, 3] = first
    affine = np.eye(4)
    affine[:3] = LPS_TO_RAS @ lps[:3]
    return affine
