"""Read NIfTI volumes with nibabel: the header first, the voxels on demand.

:func:`open_nifti` parses and checks the header (size limit, 3D shape; a 4D
file whose extra axes all have length 1 is 3D) without reading any voxel;
:func:`read_nifti` then reads the data: float32 HU after ``scl_slope`` /
``scl_inter`` for an image, the stored integers for a label map.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from cohort.errors import GeometryError, InputError
from cohort.inputs.volume import Volume, fmt_shape

__all__ = [
    "NIFTI_SUFFIXES",
    "as_labels",
    "check_shape",
    "is_nifti_file",
    "open_nifti",
    "read_nifti",
    "squeezed_shape",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError)


def is_nifti_file(path: Path) -> bool:
    """Whether the file name ends in ``.nii`` or ``.nii.gz`` (any letter case)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def open_nifti(path: Path, role: str, max_voxels: int) -> nib.Nifti1Image:
    """Open a NIfTI header (no voxel data) and check its shape and size.

    ``role`` names the file in messages ("image", "mask").
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"{role} file {path} does not exist or is not a file; fix the path in the manifest"
        )
    try:
        img = nib.load(path, mmap=False)
    except READ_ERRORS as exc:
        raise InputError(
            f"{role} file {path} is not a readable NIfTI file ({type(exc).__name__}: {exc}); "
            "convert it to .nii or .nii.gz"
        ) from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(
            f"{role} file {path} is a {type(img).__name__}, not NIfTI; "
            "convert it to .nii or .nii.gz"
        )
    check_shape(tuple(int(n) for n in img.shape), path, role, max_voxels)
    return img


def check_shape(shape: tuple[int, ...], path: Path, role: str, max_voxels: int) -> None:
    """A header's shape: at most ``max_voxels`` voxels, one 3D volume (extra axes of 1 dropped)."""
    count = math.prod(shape)
    if count > max_voxels:
        raise InputError(
            f"{role} file {path} has {fmt_shape(shape)} = {count:,} voxels, more than the "
            f"limit of {max_voxels:,}; crop or downsample it first, or raise the "
            "limit with --max-voxels"
        )
    squeezed = squeezed_shape(shape)
    if len(squeezed) > 3:
        raise GeometryError(
            f"{role} file {path} has shape {fmt_shape(shape)}, a {len(squeezed)}D series; "
            "cohort needs one 3D volume per file: split the series into 3D files"
        )
    if len(squeezed) < 3 or min(squeezed) < 2:
        raise GeometryError(
            f"{role} file {path} has shape {fmt_shape(shape)}, a 2D slice; cohort needs "
            "one 3D volume per file: stack the slices into one volume"
        )


def squeezed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing singleton axes beyond the third (X, Y, Z, 1 -> X, Y, Z)."""
    out = list(shape)
    while len(out) > 3 and out[-1] == 1:
        out.pop()
    return tuple(out)


def read_data(img: nib.Nifti1Image, path: Path, role: str, as_float: bool) -> np.ndarray:
    """Read the voxel data as a 3D array: float32 HU after scl_slope/scl_inter, or as stored."""
    try:
        data = img.get_fdata(dtype=np.float32) if as_float else np.asarray(img.dataobj)
    except (*READ_ERRORS, TypeError) as exc:
        raise InputError(
            f"{role} file {path}: the header is readable but the voxel data are not "
            f"({type(exc).__name__}: {exc}); the file is probably truncated or corrupt, "
            "copy or export it again"
        ) from None
    return data.reshape(squeezed_shape(data.shape))


def read_nifti(img: nib.Nifti1Image, path: Path, role: str, *, labels: bool) -> Volume:
    """The voxels of an opened NIfTI file as a :class:`Volume`: float32 HU, or a label map."""
    path = Path(path)
    data = read_data(img, path, role, as_float=not labels)
    kind = "label map" if labels else "image"
    return Volume(
        data=as_labels(data, path) if labels else data,
        affine=np.asarray(img.affine, dtype=np.float64),
        path=path,
        description=f"NIfTI {kind} {path.name}",
    )


def as_labels(data: np.ndarray, path: Path) -> np.ndarray:
    """Mask voxels as integers; non-integer values are an error."""
    if np.issubdtype(data.dtype, np.integer):
        return data
    if not np.issubdtype(data.dtype, np.floating):
        raise InputError(
            f"mask file {path} holds {data.dtype} values; a label mask must hold integers, "
            "save it as uint8/int16"
        )
    finite = np.isfinite(data)
    whole = finite & (data == np.round(data))
    bad = int(data.size - np.count_nonzero(whole))
    if bad:
        example = data[~whole].flat[0]
        raise InputError(
            f"mask file {path} has {bad:,} non-integer voxel values (e.g. {example!r}); "
            "a label mask must hold whole numbers: save it as an integer type, or round it "
            "if it was interpolated"
        )
    return data.astype(np.int64)
