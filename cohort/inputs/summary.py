"""What one subject's inputs are, for ``cohort validate``: the image's kind, the mask's
kind, the regions the mask holds and those the run's labels use."""

from __future__ import annotations

from dataclasses import dataclass

from cohort.config import LabelMap
from cohort.inputs.readers import VolumePair
from cohort.inputs.segmentation import LabelRegions, present_values

__all__ = ["InputSummary", "summarise"]

_FOUND = {  # what a mask kind calls its regions
    "DICOM SEG": "segments (SegmentLabel)",
    "RTSTRUCT": "ROIs (ROIName)",
    "3D Slicer segmentation": "segments",
    "mask folder": "mask files",
}


@dataclass(frozen=True)
class InputSummary:
    """One subject's inputs in words."""

    image_kind: str  # "DICOM series", "Enhanced CT" or "file"
    image: str  # the reader's description, e.g. "DICOM series 1.2.3 (20 slices)"
    mask_kind: str  # "DICOM SEG", "RTSTRUCT", "label-map file", "mask folder", ...
    found_as: str  # what the mask calls its regions: "segments (SegmentLabel)", "values"
    found: tuple[str, ...]  # every region (or label value) the mask holds
    used: tuple[str, ...]  # the regions the run's labels name

    def line(self) -> str:
        """``image: Enhanced CT ...; mask: DICOM SEG, segments (SegmentLabel) 'a', 'b';
        labels use: a``."""
        found = ", ".join(self.found) or "none"
        return (
            f"image: {self.image_kind} ({self.image}); mask: {self.mask_kind}, "
            f"{self.found_as} {found}; labels use: {', '.join(self.used) or 'none'}"
        )


def summarise(pair: VolumePair, labels: LabelMap) -> InputSummary:
    """Describe a loaded pair and which of its regions ``labels`` use."""
    description = pair.image.description
    image_kind = next(
        (kind for kind in ("DICOM series", "Enhanced CT") if description.startswith(kind)),
        "file",
    )
    regions = pair.regions
    if isinstance(regions, LabelRegions):
        values = present_values(regions.labels)
        used = tuple(f"{name}={value}" for name, value in labels)
        return InputSummary(image_kind, description, "label-map file", "values", (values,), used)
    found = tuple(repr(name) for name in (regions.present or regions.names))
    found_as = _FOUND.get(regions.description, "regions")
    return InputSummary(
        image_kind,
        description,
        regions.description,
        found_as,
        found,
        tuple(name for name, _ in labels),
    )
