"""Stage "check" and the array convention: grids, affines and orientation.

Array convention of every prepared volume: axes (D, H, W) of the RAS+ volume,
i.e. the RAS array axes (x, y, z) become (z, y, x). Index order along each
axis: D inferior -> superior, H posterior -> anterior, W left -> right.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from cohort.config import LabelMap, PreprocessConfig
from cohort.errors import GeometryError, InputError, RegionError
from cohort.inputs.volume import VolumePair, fmt_affine, fmt_shape

__all__ = ["check_pair", "to_dhw"]


def check_pair(pair: VolumePair, labels: LabelMap, cfg: PreprocessConfig) -> None:
    """Image and mask share a grid, the image is finite, every named label is present."""
    if pair.image.shape != pair.mask.shape:
        raise GeometryError(
            f"mask grid {fmt_shape(pair.mask.shape)} ({pair.mask_path}) does not match image "
            f"grid {fmt_shape(pair.image.shape)} ({pair.image_path}); resample the mask or "
            "fix the manifest"
        )
    difference = float(np.max(np.abs(pair.image_affine[:3, :] - pair.mask_affine[:3, :])))
    if not difference <= cfg.affine_tolerance_mm:
        raise GeometryError(
            f"mask affine of {pair.mask_path} differs from image affine of {pair.image_path} "
            f"by up to {difference:.6g} mm (tolerance {cfg.affine_tolerance_mm:g} mm); "
            f"image affine {fmt_affine(pair.image_affine)}, "
            f"mask affine {fmt_affine(pair.mask_affine)}; "
            "resample the mask or fix the manifest"
        )
    not_finite = int(pair.image.size - np.count_nonzero(np.isfinite(pair.image)))
    if not_finite:
        raise InputError(
            f"image file {pair.image_path} has {not_finite:,} NaN or infinite voxels; "
            "replace them (e.g. with -1000 HU) before the analysis"
        )
    for name, value in labels:
        if not np.any(pair.mask == value):
            raise RegionError(
                f"mask file {pair.mask_path} has no voxel with value {value} (label {name!r}); "
                f"values present: {_present_values(pair.mask)}; if this mask numbers its "
                "labels differently, give the row a `labels` map in the manifest "
                "(e.g. tibia=2,femur=1)"
            )


def _present_values(mask: np.ndarray, limit: int = 20) -> str:
    values = np.unique(mask)
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (f", ... ({values.size} in all)" if values.size > limit else "")


def to_dhw(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient a stored 3D array to RAS+ (closest canonical) and order axes (D, H, W).

    Returns a view of ``array`` and the voxel spacing in mm along (D, H, W).
    """
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(array, ornt)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape)
    sizes = np.linalg.norm(ras_affine[:3, :3], axis=0)  # mm per step along x, y, z
    return ras.transpose(2, 1, 0), (float(sizes[2]), float(sizes[1]), float(sizes[0]))
