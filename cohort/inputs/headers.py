"""The model input's size from the image headers alone, before any voxel is read.

The driver sizes its feature actors from the largest subject
(:mod:`cohort.execution.session`): it reads every image header while Ray
starts, for as long as :data:`SCAN_SECONDS` allows. The size is the one before
any crop (``--crop-margin`` only makes inputs smaller), so it bounds what the
loaders will prepare. A header that cannot be read is left to the subject's own
load stage, which names the problem.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from cohort.config import PreprocessConfig
from cohort.inputs.geometry import Grid, dhw_grid, model_shape
from cohort.inputs.itk import is_itk_file, read_itk_header
from cohort.inputs.nifti import nifti_affine, open_nifti, squeezed_shape
from cohort.inputs.volume import itk_affine

__all__ = ["SCAN_SECONDS", "InputSizes", "header_grid", "scan_sizes"]

SCAN_SECONDS = 10.0  # the most the driver spends reading headers before it sizes the actors
_KEEP = 8  # the largest model inputs kept (their memory estimates are compared)

Shape = tuple[int, int, int]


def header_grid(path: Path, max_voxels: int) -> Grid | None:
    """The (D, H, W) grid of an image file from its header; None for a DICOM folder
    (its grid needs every slice's header, which only its load stage reads)."""
    path = Path(path)
    if path.is_dir():
        return None
    if is_itk_file(path):
        reader = read_itk_header(path, "image", max_voxels)
        affine = itk_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin())
        return dhw_grid(tuple(int(n) for n in reader.GetSize())[:3], affine)
    img = open_nifti(path, "image", max_voxels)
    return dhw_grid(squeezed_shape(tuple(int(n) for n in img.shape)), nifti_affine(img, path))


@dataclass(frozen=True)
class InputSizes:
    """What the header scan found: how many images it sized, and the largest inputs."""

    sized: int  # images whose model input size is known
    total: int  # images in the manifest
    largest: tuple[Shape, ...]  # the largest model inputs (D, H, W), most voxels first
    # with --spacing: the stored grid (D, H, W) each of ``largest`` is resampled from in the
    # actor (its resampling's memory scales with it); empty without
    windows: tuple[Shape, ...] = ()

    @property
    def complete(self) -> bool:
        """Whether every image was sized (only then do the largest bound the run)."""
        return self.sized == self.total and self.total > 0


def _model_input(path: Path, cfg: PreprocessConfig) -> tuple[Shape, Shape] | None:
    """The model input's shape and the stored grid's, from the image header."""
    try:
        grid = header_grid(path, cfg.max_voxels)
    except Exception:  # the subject's load stage reports it, with its own message
        return None
    return None if grid is None else (model_shape(grid, cfg), grid.shape)


def scan_sizes(
    images: Sequence[Path], cfg: PreprocessConfig, seconds: float = SCAN_SECONDS
) -> InputSizes:
    """Read the headers of ``images`` (in threads, for at most ``seconds``); returns
    how many were sized and the largest model inputs before any crop: the
    :data:`_KEEP` with the most voxels and, with ``--spacing``, also those of the
    :data:`_KEEP` largest stored grids, with their grids."""
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(_model_input, Path(p), cfg) for p in images]
        done, _ = wait(futures, timeout=max(0.0, seconds - (time.monotonic() - started)))
        pool.shutdown(cancel_futures=True)  # those not started; running ones finish
        found = [s for s in (f.result() for f in done) if s is not None]
    if cfg.target_spacing is None:
        shapes = {model for model, _ in found}
        largest = sorted(shapes, key=lambda s: (math.prod(s), s), reverse=True)[:_KEEP]
        return InputSizes(len(found), len(images), tuple(largest))
    pairs = set(found)
    kept: set[tuple[Shape, Shape]] = set()
    for side in (0, 1):  # the largest model inputs, and the largest stored grids
        ranked = sorted(pairs, key=lambda p: (math.prod(p[side]), p), reverse=True)
        kept.update(ranked[:_KEEP])
    ordered = sorted(kept, key=lambda p: (math.prod(p[0]), p), reverse=True)
    return InputSizes(
        len(found),
        len(images),
        tuple(model for model, _ in ordered),
        tuple(stored for _, stored in ordered),
    )
