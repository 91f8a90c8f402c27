"""Stage "load": read an image and its mask from disk, headers checked before voxels.

Pure numpy + nibabel. A :class:`VolumePair` holds both arrays as stored, with
their voxel -> world (RAS mm) affines; nothing is reoriented here.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from cohort.config import PreprocessConfig
from cohort.errors import GeometryError, InputError
from cohort.inputs.volume import VolumePair, fmt_shape

__all__ = ["VolumePair", "load_pair"]

_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError)


def load_pair(image: Path, mask: Path, cfg: PreprocessConfig) -> VolumePair:
    """Read an image and its mask; headers are checked before any data is read.

    Raises :class:`InputError` (or :class:`GeometryError` for non-3D shapes)
    naming the file and the fix.
    """
    image, mask = Path(image), Path(mask)
    image_img = _open(image, "image", cfg)
    mask_img = _open(mask, "mask", cfg)
    image_data = _read(image_img, image, "image", as_float=True)
    mask_data = _read(mask_img, mask, "mask", as_float=False)
    return VolumePair(
        image=image_data,
        mask=_as_labels(mask_data, mask),
        image_affine=np.asarray(image_img.affine, dtype=np.float64),
        mask_affine=np.asarray(mask_img.affine, dtype=np.float64),
        image_path=image,
        mask_path=mask,
    )


def _open(path: Path, role: str, cfg: PreprocessConfig) -> nib.Nifti1Image:
    """Open a NIfTI header (no voxel data) and check its shape and size."""
    if not path.is_file():
        raise InputError(
            f"{role} file {path} does not exist or is not a file; fix the path in the manifest"
        )
    try:
        img = nib.load(path, mmap=False)
    except _READ_ERRORS as exc:
        raise InputError(
            f"{role} file {path} is not a readable NIfTI file ({type(exc).__name__}: {exc}); "
            "convert it to .nii or .nii.gz"
        ) from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(
            f"{role} file {path} is a {type(img).__name__}, not NIfTI; "
            "convert it to .nii or .nii.gz"
        )
    shape = tuple(int(n) for n in img.shape)
    count = math.prod(shape)
    if count > cfg.max_voxels:
        raise InputError(
            f"{role} file {path} has {fmt_shape(shape)} = {count:,} voxels, more than the "
            f"limit of {cfg.max_voxels:,}; crop or downsample it first, or raise the "
            "limit with --max-voxels"
        )
    squeezed = _squeezed_shape(shape)
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
    return img


def _squeezed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing singleton axes beyond the third (X, Y, Z, 1 -> X, Y, Z)."""
    out = list(shape)
    while len(out) > 3 and out[-1] == 1:
        out.pop()
    return tuple(out)


def _read(img: nib.Nifti1Image, path: Path, role: str, as_float: bool) -> np.ndarray:
    """Read the voxel data as a 3D array: float32 HU after scl_slope/scl_inter, or as stored."""
    try:
        data = img.get_fdata(dtype=np.float32) if as_float else np.asarray(img.dataobj)
    except (*_READ_ERRORS, TypeError) as exc:
        raise InputError(
            f"{role} file {path}: the header is readable but the voxel data are not "
            f"({type(exc).__name__}: {exc}); the file is probably truncated or corrupt, "
            "copy or export it again"
        ) from None
    return data.reshape(_squeezed_shape(data.shape))


def _as_labels(data: np.ndarray, path: Path) -> np.ndarray:
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
