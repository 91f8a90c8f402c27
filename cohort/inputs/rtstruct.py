"""An RTSTRUCT as named regions, its contours filled on the image's grid.

Each ROI is a region named by its ROIName (bare names in ``--labels`` or the
``labels`` column). Its CLOSED_PLANAR contours (ContourData: x, y, z points in
patient coordinates, LPS mm) are taken into the image's voxel indices and must
be planar and parallel to one family of the image's slice planes. On each
plane, every contour of the ROI is filled together by the even-odd rule, and a
voxel is in the ROI when its centre is inside (:mod:`cohort.inputs.contours`):
a contour inside another is a hole. Other contour types (POINT, OPEN_PLANAR)
enclose nothing and are not used; an ROI with no closed contour is an empty
region (an error only if the run names it).

Contours on the image's slices (each within 1 % of the slice spacing of a
slice plane, the usual case: drawn on this image) are filled on the image's
grid. Contours between the image's slices (drawn on another reconstruction)
are an error unless ``--mask-resample nearest``: then they are filled on their
own planes (the image's in-plane grid, the contours' planes evenly spaced) and
the check stage gives each image voxel the nearest of those planes' voxels. A
contour enclosing voxel centres outside the image is an error. The image series
the RTSTRUCT references is checked by
:func:`cohort.inputs.dicom_objects.check_reference`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from cohort.config import MaskResample, PreprocessConfig
from cohort.errors import GeometryError, InputError, RegionError
from cohort.inputs.contours import fill_even_odd
from cohort.inputs.dicom_objects import DicomObject, check_reference, pick_named
from cohort.inputs.segmentation import NamedMasks
from cohort.inputs.volume import LPS_TO_RAS, Volume, fmt_shape

__all__ = ["ON_PLANE", "Roi", "open_rtstruct", "rtstruct_rois"]

ON_PLANE = 0.01  # a contour is on a plane within this fraction of the plane spacing
_MAX_VOXELS = PreprocessConfig.max_voxels
_CLOSED = "CLOSED_PLANAR"


@dataclass(frozen=True, eq=False)
class Roi:
    """One ROI of an RTSTRUCT: number, name and its closed planar contours."""

    number: int  # ROINumber
    name: str  # ROIName: the region's name
    contours: tuple[np.ndarray, ...]  # (n, 3) points each, RAS mm
    other_types: tuple[str, ...]  # geometric types of the contours not used

    def source(self) -> str:
        """``ROI 3 'liver'``, saying why when it has no closed contour."""
        if self.contours:
            return f"ROI {self.number} {self.name!r}"
        if self.other_types:
            kinds = ", ".join(f"{k} x{n}" for k, n in sorted(Counter(self.other_types).items()))
            return f"ROI {self.number} {self.name!r}, no closed planar contours ({kinds})"
        return f"ROI {self.number} {self.name!r}, no contours"


def rtstruct_rois(ds: pydicom.Dataset, path: Path) -> list[Roi]:
    """The ROIs of an RTSTRUCT, in StructureSetROISequence order, with their contours."""
    contours: dict[int, list[np.ndarray]] = defaultdict(list)
    others: dict[int, list[str]] = defaultdict(list)
    for item in ds.get("ROIContourSequence") or []:
        number = int(item.get("ReferencedROINumber", 0))
        for contour in item.get("ContourSequence") or []:
            kind = str(contour.get("ContourGeometricType", "")).upper()
            data = _contour_data(contour)
            if kind != _CLOSED or data.size < 9:
                others[number].append(kind or "no ContourGeometricType")
                continue
            if data.size % 3 or not np.all(np.isfinite(data)):
                raise InputError(
                    f"RTSTRUCT {path}: ROI {number} has ContourData of {data.size} values "
                    "that are not x, y, z triplets of numbers; export the structure set again"
                )
            contours[number].append(data.reshape(-1, 3) @ LPS_TO_RAS)
    rois = [
        Roi(
            number=int(item.get("ROINumber", 0)),
            name=str(item.get("ROIName", "")).strip(),
            contours=tuple(contours.get(int(item.get("ROINumber", 0)), ())),
            other_types=tuple(others.get(int(item.get("ROINumber", 0)), ())),
        )
        for item in ds.get("StructureSetROISequence") or []
    ]
    for roi in rois:
        if not roi.name:
            raise InputError(
                f"RTSTRUCT {path}: ROI {roi.number} has no ROIName, so no region name; name it "
                "in the tool that wrote the structure set"
            )
    if not rois:
        raise InputError(f"RTSTRUCT {path} lists no ROIs (empty StructureSetROISequence)")
    return rois


def _contour_data(contour: pydicom.Dataset) -> np.ndarray:
    """ContourData as float64, parsed by numpy from the raw text when pydicom has not
    converted it yet (pydicom's DS values cost ~10 us each: 20 s for 1.5 million)."""
    if "ContourData" not in contour:
        return np.zeros(0)
    raw = contour.get_item("ContourData")
    if raw is not None and isinstance(raw.value, bytes):
        text = raw.value.decode("ascii", errors="replace").replace("\\", " ")
        try:
            return np.array(text.split(), dtype=np.float64)
        except ValueError:
            pass  # let pydicom say what is wrong
    return np.asarray(contour.ContourData, dtype=np.float64)


def open_rtstruct(
    found: DicomObject,
    names: Sequence[str],
    *,
    mask_resample: MaskResample = "off",
    max_voxels: int = _MAX_VOXELS,
) -> Callable[[Volume], NamedMasks]:
    """Read an RTSTRUCT's ROIs and check the region ``names`` now (none: every ROI); the
    returned function fills the ROIs on the image's grid."""
    path = found.path
    try:
        ds = pydicom.dcmread(path)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError) as exc:
        raise InputError(f"RTSTRUCT {path} cannot be read ({exc}); export it again") from None
    every = rtstruct_rois(ds, path)
    picked = pick_named([(r.number, r.name) for r in every], names, f"RTSTRUCT {path}", "ROIName")
    chosen = [every[n] for n in picked]

    def read(image: Volume) -> NamedMasks:
        planes = _Planes.of(chosen, image, path)
        if not planes.on_slices and mask_resample != "nearest":
            raise GeometryError(
                f"RTSTRUCT {path}: the contours lie between the slices of the image "
                f"{image.path} (up to {planes.off_mm:.4g} mm from the nearest slice plane, "
                f"slices {planes.spacing_mm:.4g} mm apart); they were drawn on another "
                "reconstruction: give the image they were drawn on, or --mask-resample nearest "
                "(each image voxel takes the nearest contour plane's voxel)"
            )
        check_reference(found, image, planes.on_slices, mask_resample)
        count = int(np.prod(planes.shape))
        if count > max_voxels:
            raise InputError(
                f"RTSTRUCT {path}: its contour planes make a grid of {fmt_shape(planes.shape)} "
                f"= {count:,} voxels, more than the limit of {max_voxels:,}; raise the limit "
                "with --max-voxels"
            )
        return NamedMasks(
            names=tuple(r.name for r in chosen),
            masks=tuple(planes.fill(r, path) for r in chosen),
            sources=tuple(r.source() for r in chosen),
            affine=planes.affine,
            path=path,
            description="RTSTRUCT",
            present=tuple(r.name for r in every) if len(chosen) < len(every) else (),
        )

    return read


@dataclass(frozen=True, eq=False)
class _Planes:
    """The planes the contours are filled on: the image's slices, or their own."""

    axis: int  # the image's stored axis the planes are across
    first: float  # position of plane 0 along ``axis``, in image voxel indices
    step: float  # planes apart, in image voxel indices (1.0 on the image's slices)
    shape: tuple[int, int, int]  # the grid filled
    affine: np.ndarray  # its voxel -> RAS mm affine
    on_slices: bool
    off_mm: float  # farthest contour from an image slice plane (mm)
    spacing_mm: float  # the image's slice spacing along ``axis`` (mm)
    indices: dict[int, list[np.ndarray]]  # ROI number -> its contours in image indices

    @staticmethod
    def of(rois: Sequence[Roi], image: Volume, path: Path) -> _Planes:
        to_index = np.linalg.inv(image.affine)
        indices = {
            r.number: [(to_index[:3, :3] @ c.T).T + to_index[:3, 3] for c in r.contours]
            for r in rois
        }
        contours = [c for cs in indices.values() for c in cs]
        spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
        axes = [a for a in range(3) if all(np.ptp(c[:, a]) <= ON_PLANE for c in contours)]
        if contours and not axes:
            raise GeometryError(
                f"RTSTRUCT {path}: its contours are not parallel to any family of the image's "
                f"slice planes (image {image.path}, {fmt_shape(image.shape)}); cohort fills "
                "contours on the image's planes: resample the image to the contours' "
                "orientation, or convert the RTSTRUCT on the image (e.g. with plastimatch)"
            )
        axis = 2 if 2 in axes else axes[0]  # the slice axis of a DICOM image first
        levels = np.array([float(np.mean(c[:, axis])) for c in contours])
        off = np.abs(levels - np.round(levels)) if levels.size else np.zeros(0)
        on_slices = bool(np.all(off <= ON_PLANE))
        if on_slices:
            first, step, count = 0.0, 1.0, image.shape[axis]
        else:
            first, step, count = _even_planes(levels, path)
        shape = [int(n) for n in image.shape]
        shape[axis] = count
        affine = image.affine.copy()
        affine[:3, 3] += first * image.affine[:3, axis]
        affine[:3, axis] *= step
        return _Planes(
            axis=axis,
            first=first,
            step=step,
            shape=(shape[0], shape[1], shape[2]),
            affine=affine,
            on_slices=on_slices,
            off_mm=float(np.max(off, initial=0.0) * spacing[axis]),
            spacing_mm=float(spacing[axis]),
            indices=indices,
        )

    def fill(self, roi: Roi, path: Path) -> np.ndarray:
        """The ROI's voxels on the grid: every contour on a plane filled together."""
        in_plane = [a for a in range(3) if a != self.axis]
        size = (self.shape[in_plane[0]], self.shape[in_plane[1]])
        by_plane: dict[int, list[np.ndarray]] = defaultdict(list)
        for contour in self.indices[roi.number]:
            plane = round((float(np.mean(contour[:, self.axis])) - self.first) / self.step)
            by_plane[plane].append(contour[:, in_plane])
        out = np.zeros(self.shape, dtype=bool)
        outside = 0
        for plane, polygons in by_plane.items():
            low = np.floor(np.min([p.min(axis=0) for p in polygons], axis=0)).astype(int)
            high = np.ceil(np.max([p.max(axis=0) for p in polygons], axis=0)).astype(int)
            low, high = np.minimum(low, 0), np.maximum(high, np.array(size) - 1)
            extent = (int(high[0] - low[0] + 1), int(high[1] - low[1] + 1))
            wide = fill_even_odd([p - low for p in polygons], extent)
            start = -low
            inside = wide[start[0] : start[0] + size[0], start[1] : start[1] + size[1]]
            outside += int(np.count_nonzero(wide)) - int(np.count_nonzero(inside))
            if not 0 <= plane < self.shape[self.axis]:
                outside += int(np.count_nonzero(inside))
                continue
            index: list[slice | int] = [slice(None)] * 3
            index[self.axis] = plane
            out[tuple(index)] ^= inside
        if outside:
            raise RegionError(
                f"{roi.source()} of RTSTRUCT {path} encloses {outside:,} voxel centres outside "
                f"the image ({fmt_shape(self.shape)} on the contours' planes); give the image "
                "the structure set was drawn on, or leave the ROI out of the labels"
            )
        return out


def _even_planes(levels: np.ndarray, path: Path) -> tuple[float, float, int]:
    """(first plane, spacing, count) of contour planes at ``levels`` (image indices),
    which must be evenly spaced with whole gaps of one spacing."""
    unique = np.unique(np.round(levels, 3))
    if unique.size == 1:
        return float(unique[0]), 1.0, 1
    gaps = np.diff(unique)
    step = float(np.min(gaps))
    ratios = gaps / step
    if np.any(np.abs(ratios - np.round(ratios)) > ON_PLANE * np.round(ratios) + ON_PLANE):
        raise GeometryError(
            f"RTSTRUCT {path}: its contour planes are not evenly spaced (gaps of "
            f"{', '.join(f'{g:.4g}' for g in sorted(set(np.round(gaps, 4))))} image slices), "
            "so they cannot be resampled onto the image; give the image they were drawn on"
        )
    return float(unique[0]), step, round(float(unique[-1] - unique[0]) / step) + 1
