"""A DICOM SEG as named regions on its image's grid.

Each segment is a region named by its SegmentLabel (bare names in ``--labels``
or the ``labels`` column, as for a mask folder). The header is read first
(pydicom, no pixel data): the segments, which frames hold each, the size. The
frames are then read with highdicom (``Segmentation.get_volume``), which decodes
them (bit-packed binary, fractional, compressed) and stacks them by their
positions (PlanePositionSequence), never by frame order; segments stay apart,
so segments that overlap keep every voxel.

Binary segments are the voxels with value 1. Fractional segments (probability
or occupancy, 0 to MaximumFractionalValue) are the voxels at least half in: a
fraction of 0.5 or more.

When the SEG's volume lies on the image's voxel lattice (the usual case: the
SEG was made on this image, with frames for some of its slices), each segment
is placed on the image's grid by index (:mod:`cohort.inputs.lattice`); its
voxels outside the image are an error. Otherwise the regions keep the SEG's
own grid, and the check stage refuses them or, with ``--mask-resample
nearest``, resamples them. A segment listed in the SEG with no frames is an
empty region (an error only if the run names it). The image series the SEG
references is checked by :func:`cohort.inputs.dicom_objects.check_reference`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from cohort.config import MaskResample, PreprocessConfig
from cohort.errors import InputError, RegionError
from cohort.inputs.dicom_objects import DicomObject, check_reference, pick_named
from cohort.inputs.lattice import lattice_map, place
from cohort.inputs.segmentation import NamedMasks
from cohort.inputs.volume import Volume, fmt_shape, from_slice_row_column

__all__ = ["FRACTION_INSIDE", "SegSegment", "open_seg", "seg_segments"]

FRACTION_INSIDE = 0.5  # a voxel of a fractional segment is in the region from this fraction on
_MAX_VOXELS = PreprocessConfig.max_voxels
_TOLERANCE_MM = PreprocessConfig.affine_tolerance_mm


@dataclass(frozen=True)
class SegSegment:
    """One segment of a SEG header."""

    number: int  # SegmentNumber
    label: str  # SegmentLabel: the region's name
    frames: int  # how many frames hold it

    def source(self) -> str:
        """``segment 2 'liver'``, with ``, no frames`` when it has none."""
        empty = ", no frames in the SEG" if not self.frames else ""
        return f"segment {self.number} {self.label!r}{empty}"


def seg_segments(ds: pydicom.Dataset, path: Path) -> list[SegSegment]:
    """The segments of a SEG header, in SegmentSequence order, with their frame counts."""
    counts: Counter[int] = Counter()
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    every_frame = (shared.get("SegmentIdentificationSequence") or []) if shared else []
    if every_frame:  # one segment in every frame, said once
        counts[int(every_frame[0].ReferencedSegmentNumber)] = int(ds.get("NumberOfFrames", 0))
    for group in ds.get("PerFrameFunctionalGroupsSequence") or []:
        for item in group.get("SegmentIdentificationSequence") or []:
            counts[int(item.ReferencedSegmentNumber)] += 1
    segments: list[SegSegment] = []
    for item in ds.get("SegmentSequence") or []:
        number = int(item.get("SegmentNumber", 0))
        label = str(item.get("SegmentLabel", "")).strip()
        if not label:
            raise InputError(
                f"DICOM SEG {path}: segment {number} has no SegmentLabel, so no region name; "
                "label it in the tool that wrote the SEG"
            )
        segments.append(SegSegment(number, label, counts.get(number, 0)))
    if not segments:
        raise InputError(
            f"DICOM SEG {path} lists no segments (empty SegmentSequence); export the "
            "segmentation again"
        )
    return segments


def open_seg(
    found: DicomObject,
    names: Sequence[str],
    *,
    mask_resample: MaskResample = "off",
    max_voxels: int = _MAX_VOXELS,
    affine_tolerance_mm: float = _TOLERANCE_MM,
) -> Callable[[Volume], NamedMasks]:
    """Check a SEG's header and the region ``names`` now (none: every segment); the
    returned function reads the frames and puts the segments on the image's grid."""
    path = found.path
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    every = seg_segments(ds, path)
    picked = pick_named(
        [(s.number, s.label) for s in every], names, f"DICOM SEG {path}", "SegmentLabel"
    )
    chosen = [every[n] for n in picked]
    frames = int(ds.get("NumberOfFrames", 0) or 0)
    count = frames * int(ds.get("Rows", 0)) * int(ds.get("Columns", 0))
    if count > max_voxels:
        raise InputError(
            f"DICOM SEG {path} has {frames} frames of {ds.get('Columns')}x{ds.get('Rows')} = "
            f"{count:,} voxels, more than the limit of {max_voxels:,}; raise the limit with "
            "--max-voxels"
        )
    fractional = str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL"

    def read(image: Volume) -> NamedMasks:
        masks, affine = _read_frames(path, [s for s in chosen if s.frames], fractional)
        index = (
            lattice_map(masks.shape[:3], affine, image.affine, affine_tolerance_mm)
            if masks.shape[3]
            else np.eye(4, dtype=np.int64)  # no chosen segment has frames: nothing to place
        )
        check_reference(found, image, index is not None, mask_resample)
        shape = image.shape if index is not None else masks.shape[:3]
        out: list[np.ndarray] = []
        channel = 0
        for segment in chosen:
            if not segment.frames:
                out.append(np.zeros(shape, dtype=bool))
                continue
            mask = masks[..., channel]
            channel += 1
            if index is not None:
                mask, outside = place(mask, index, image.shape)
                if outside:
                    raise RegionError(
                        f"{segment.source()} of DICOM SEG {path} has {outside:,} voxels outside "
                        f"the image {image.path} ({fmt_shape(image.shape)}); give the image "
                        "the SEG was drawn on, or leave the segment out of the labels"
                    )
            out.append(mask)
        return NamedMasks(
            names=tuple(s.label for s in chosen),
            masks=tuple(out),
            sources=tuple(s.source() for s in chosen),
            affine=image.affine if index is not None else affine,
            path=path,
            description="DICOM SEG",
            present=tuple(s.label for s in every) if len(chosen) < len(every) else (),
        )

    return read


def _read_frames(
    path: Path, segments: list[SegSegment], fractional: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The segments' frames stacked by position: a bool (column, row, slice, segment)
    array and its RAS affine (an empty array when ``segments`` is empty)."""
    if not segments:
        return np.zeros((1, 1, 1, 0), dtype=bool), np.eye(4)
    import highdicom as hd  # only for DICOM objects (about 1.5 s to import)

    try:
        volume = hd.seg.segread(str(path)).get_volume(
            segment_numbers=[s.number for s in segments],
            combine_segments=False,
            rescale_fractional=True,
            allow_missing_positions=True,
            dtype=np.float32,
        )
    except (RuntimeError, ValueError, NotImplementedError, KeyError) as exc:
        raise InputError(
            f"DICOM SEG {path}: highdicom cannot stack its frames into a volume ({exc}); the "
            "frames may not lie on parallel, evenly spaced planes: export the SEG again from "
            "the series it was drawn on"
        ) from None
    data, affine = from_slice_row_column(volume.array, volume.affine)
    if data.ndim == 3:
        data = data[..., None]
    inside = data >= FRACTION_INSIDE if fractional else data > 0
    return inside, affine
