"""One volume as stored, and its conversions to and from SimpleITK images.

A :class:`Volume` follows nibabel's convention, so everything written for the
NIfTI reader (e.g. :func:`cohort.inputs.geometry.to_dhw`) works on it
unchanged:

- ``data[i, j, k]`` is the voxel at stored index ``(i, j, k)``: ``i`` is the
  fastest-varying index in the file (a DICOM column, NRRD's first axis);
- ``affine @ (i, j, k, 1)`` is that voxel's centre in world millimetres,
  RAS+: x grows towards the patient's right, y anterior, z superior.

A SimpleITK image uses the other two conventions of the field:

- ``sitk.GetArrayFromImage(image)[k, j, i]`` is the voxel at ITK index
  ``(i, j, k)``: numpy axes in reverse order;
- index ``(i, j, k)`` sits at ``origin + direction @ diag(spacing) @ (i, j, k)``
  in LPS+ millimetres: x grows towards the patient's left, y posterior,
  z superior.

So, with ``F = diag(-1, -1, 1)`` (LPS <-> RAS, its own inverse)::

    data          = array.transpose(2, 1, 0)
    affine[:3, :3] = F @ direction @ diag(spacing)
    affine[:3, 3]  = F @ origin

and back: ``spacing`` = the column norms of ``affine[:3, :3]``,
``direction = F @ affine[:3, :3] / spacing``, ``origin = F @ affine[:3, 3]``.

A highdicom ``Volume`` (Enhanced CT, DICOM SEG) has array axes (slice, row,
column) and an affine from those indices to LPS+ mm:
:func:`from_slice_row_column` reverses the axes and flips to RAS+.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cohort.errors import GeometryError

if TYPE_CHECKING:
    import SimpleITK as sitk  # noqa: N813 (the name SimpleITK's own documentation uses)

__all__ = [
    "LPS_TO_RAS",
    "SeriesIdentity",
    "Volume",
    "axis_mapping",
    "corner_distance",
    "fmt_affine",
    "fmt_shape",
    "from_slice_row_column",
    "grid_corners",
    "itk_affine",
    "volume_from_sitk",
    "volume_to_sitk",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])  # flips x and y; its own inverse (RAS -> LPS)


@dataclass(frozen=True)
class SeriesIdentity:
    """Which DICOM series a volume was read from: what a DICOM SEG or RTSTRUCT names its
    image by (``""`` where the files leave a UID absent or empty)."""

    series_uid: str  # SeriesInstanceUID
    frame_of_reference_uid: str  # FrameOfReferenceUID


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D array in stored index order (i, j, k) and its voxel -> RAS mm affine."""

    data: np.ndarray  # 3D; float32 HU for images, integers for label maps
    affine: np.ndarray  # 4x4 float64: (i, j, k, 1) -> RAS+ world mm (nibabel's convention)
    path: Path  # the file or folder it was read from
    description: str  # what was read, e.g. "DICOM series 1.2.3 (20 slices)"
    identity: SeriesIdentity | None = None  # the DICOM series' UIDs; None for other files

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise GeometryError(
                f"{self.description} ({self.path}): a Volume holds a 3D array, got shape "
                f"{self.data.shape}; squeeze or split the data first"
            )
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise GeometryError(
                f"{self.description} ({self.path}): the affine must be a finite 4x4 matrix, "
                f"got {affine.tolist()}; fix the file's header"
            )
        object.__setattr__(self, "affine", affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        i, j, k = (int(n) for n in self.data.shape)
        return i, j, k


def volume_from_sitk(image: sitk.Image, path: Path, description: str) -> Volume:
    """A :class:`Volume` from a scalar SimpleITK image (copies the voxels once).

    Images of more than 3 dimensions are accepted when every axis beyond the
    third has length 1 (``x, y, z, 1``): they are the 3D volume at index 0 of
    those axes, placed by the top-left 3x3 block of the direction matrix.
    """
    import SimpleITK as sitk  # noqa: N813

    path = Path(path)
    dim = image.GetDimension()
    size = tuple(int(n) for n in image.GetSize())
    if dim < 3 or any(n != 1 for n in size[3:]):
        raise GeometryError(
            f"{description} ({path}) has size {size}; a Volume is 3D (extra axes of "
            "length 1 are dropped): split it into 3D volumes"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise GeometryError(
            f"{description} ({path}) has {image.GetNumberOfComponentsPerPixel()} values per "
            "voxel; a Volume holds one value per voxel: save each component as its own file"
        )
    array = sitk.GetArrayFromImage(image)  # (..., k, j, i)
    data = array.reshape(array.shape[-3:]).transpose(2, 1, 0)
    affine = itk_affine(image.GetDirection(), image.GetSpacing(), image.GetOrigin())
    return Volume(data=data, affine=affine, path=path, description=description)


def itk_affine(
    direction: Sequence[float], spacing: Sequence[float], origin: Sequence[float]
) -> np.ndarray:
    """The voxel -> RAS+ affine of an ITK image (LPS world) of any dimension: its first
    three axes, placed by the top-left 3x3 block of the direction matrix."""
    dim = len(spacing)
    rotation = np.asarray(direction, dtype=np.float64).reshape(dim, dim)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ rotation @ np.diag(np.asarray(spacing, dtype=np.float64)[:3])
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(origin, dtype=np.float64)[:3]
    return affine


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """A 3D SimpleITK image holding ``volume`` (voxels copied, dtype kept).

    Inverse of :func:`volume_from_sitk` for 3D images, up to float64 rounding
    of the spacing and direction.
    """
    import SimpleITK as sitk  # noqa: N813

    columns = volume.affine[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if not np.all(spacing > 0) or not math.isfinite(float(np.linalg.cond(columns))):
        raise GeometryError(
            f"{volume.description} ({volume.path}): the affine "
            f"{np.round(volume.affine, 4).tolist()} is singular; fix the header"
        )
    image = sitk.GetImageFromArray(
        np.ascontiguousarray(volume.data.transpose(2, 1, 0)), isVector=False
    )
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (LPS_TO_RAS @ columns / spacing).ravel()))
    image.SetOrigin(tuple(float(v) for v in LPS_TO_RAS @ volume.affine[:3, 3]))
    return image


def fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(n)) for n in shape)


def fmt_affine(affine: np.ndarray) -> str:
    """The top three rows of an affine on one line, rounded to 1e-4 mm."""
    rows = np.round(np.asarray(affine, dtype=np.float64)[:3], 4) + 0.0  # + 0.0 drops -0.0
    return "[" + ", ".join("[" + ", ".join(f"{v:g}" for v in row) + "]" for row in rows) + "]"


def grid_corners(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """The world positions (mm, the affine's frame) of a grid's 8 corner voxel centres,
    as an (8, 3) array: index 0 or n - 1 along each axis, in a fixed order."""
    last = [max(int(n) - 1, 0) for n in shape[:3]]
    index = np.array(
        [(i, j, k, 1.0) for i in (0, last[0]) for j in (0, last[1]) for k in (0, last[2])]
    )
    corners: np.ndarray = (np.asarray(affine, dtype=np.float64) @ index.T).T[:, :3]
    return corners


def corner_distance(shape: Sequence[int], a: np.ndarray, b: np.ndarray) -> float:
    """How far apart (mm) two affines place the corner voxel centres of one grid of
    ``shape``: the largest distance over the 8 corners. An affine is linear in the
    index, so no voxel centre of the grid is placed further apart than its corners."""
    difference = grid_corners(shape, a) - grid_corners(shape, b)
    return float(np.max(np.linalg.norm(difference, axis=1)))


def axis_mapping(
    shape: Sequence[int],
    affine: np.ndarray,
    onto_shape: Sequence[int],
    onto_affine: np.ndarray,
    tolerance_mm: float,
) -> np.ndarray | None:
    """How to re-index an array stored on one grid so that it is stored as another grid
    is, when both are the same physical grid (every corner voxel centre within
    ``tolerance_mm``) in another axis order or direction; None when they are not.

    Returns a nibabel orientation (``ornt``: stored axis i goes to axis ``ornt[i, 0]``,
    reversed when ``ornt[i, 1]`` is -1) for ``nibabel.orientations.apply_orientation``.
    The candidates are tried exactly, not by the closest canonical axes, so a grid
    whose axes lie at 45 degrees to the world's is matched however float rounding
    tips ``io_orientation``'s choice.
    """
    from nibabel.orientations import inv_ornt_aff

    affine = np.asarray(affine, dtype=np.float64)
    target = tuple(int(n) for n in onto_shape)
    # the identity first: the common case of two grids stored alike
    for order in itertools.permutations(range(3)):
        moved = tuple(int(shape[order.index(axis)]) for axis in range(3))
        if moved != target:
            continue
        for flips in itertools.product((1.0, -1.0), repeat=3):
            ornt = np.array([[order[i], flips[i]] for i in range(3)], dtype=np.float64)
            placed = affine @ inv_ornt_aff(ornt, tuple(int(n) for n in shape[:3]))
            if corner_distance(target, placed, onto_affine) <= tolerance_mm:
                return ornt
    return None


def from_slice_row_column(
    array: np.ndarray, affine_lps: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A highdicom volume's (slice, row, column, ...) array and LPS affine as the stored
    (column, row, slice, ...) view and its RAS affine (no copy)."""
    affine = np.eye(4)
    affine[:3] = LPS_TO_RAS @ np.asarray(affine_lps, dtype=np.float64)[:3][:, [2, 1, 0, 3]]
    axes = (2, 1, 0, *range(3, np.ndim(array)))
    return np.asarray(array).transpose(axes), affine
