"""Tiny NIfTI builders for tests: exact, seeded, no cleverness."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def save_nifti(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray | None = None,
    *,
    slope: float | None = None,
    inter: float | None = None,
) -> Path:
    """Write ``data`` as stored (its dtype kept) with ``affine`` (identity by default).

    With ``slope``/``inter`` the file's scl_slope/scl_inter are set, so a reader
    sees ``data * slope + inter``.
    """
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    img.header.set_data_dtype(data.dtype)
    if slope is not None or inter is not None:
        img.header.set_slope_inter(1.0 if slope is None else slope, 0.0 if inter is None else inter)
    nib.save(img, path)
    return path


def save_pair(
    folder: Path, hu: np.ndarray, mask: np.ndarray, affine: np.ndarray | None = None, stem: str = ""
) -> tuple[Path, Path]:
    """``hu`` and ``mask`` saved with one ``affine``: ``{stem}i.nii.gz``, ``{stem}m.nii.gz``."""
    image = save_nifti(folder / f"{stem}i.nii.gz", hu, affine)
    return image, save_nifti(folder / f"{stem}m.nii.gz", mask, affine)


def lps_from_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same physical volume stored LPS: first two axes flipped, affine to match.

    Stored index i' along a flipped axis of length n is original index n - 1 - i'.
    """
    nx, ny = data.shape[0], data.shape[1]
    flip = np.array(
        [
            [-1.0, 0.0, 0.0, nx - 1.0],
            [0.0, -1.0, 0.0, ny - 1.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    return np.ascontiguousarray(data[::-1, ::-1, :]), affine @ flip


def zyx_from_xyz(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same physical volume stored with axes in (z, y, x) order ("SAR" for a RAS input)."""
    return np.ascontiguousarray(data.transpose(2, 1, 0)), affine[:, [2, 1, 0, 3]]
