"""DICOM objects told apart by content: what a file is (its SOP Class UID), and which
image series a segmentation object names.

A mask given as a DICOM file, or as a folder holding one, is recognised by what
it is, not by its name: a DICOM SEG (Segmentation Storage) or an RTSTRUCT (RT
Structure Set Storage). Files are DICOM when they carry the Part 10 preamble
(``DICM`` at byte 128) or end in ``.dcm``. pydicom is imported only when a DICOM
file is read.

Both objects name the image they were drawn on: a SEG by its
ReferencedSeriesSequence (SeriesInstanceUID) and FrameOfReferenceUID, an
RTSTRUCT by its ReferencedFrameOfReferenceSequence (frame of reference, and the
series under RTReferencedStudySequence / RTReferencedSeriesSequence).
:func:`check_reference` holds the rule for an image of another series.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cohort.config import BACKGROUND, MaskResample
from cohort.errors import GeometryError, InputError, RegionError
from cohort.inputs.segmentation import region_name
from cohort.inputs.volume import Volume

__all__ = [
    "RTSTRUCT",
    "SEG",
    "DicomObject",
    "ObjectKind",
    "check_reference",
    "dicom_object",
    "find_dicom_mask",
    "is_dicom_file",
    "pick_named",
]

SEG: Final = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
RTSTRUCT: Final = "1.2.840.10008.5.1.4.1.1.481.3"  # RT Structure Set Storage
ObjectKind = Literal["DICOM SEG", "RTSTRUCT", "image", "other"]
_KINDS: Final[dict[str, ObjectKind]] = {SEG: "DICOM SEG", RTSTRUCT: "RTSTRUCT"}
_HEADER_TAGS = [
    "SOPClassUID",
    "Modality",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "ReferencedSeriesSequence",
    "ReferencedFrameOfReferenceSequence",
    "NumberOfFrames",
    "Rows",
]


@dataclass(frozen=True)
class DicomObject:
    """One DICOM file: what it is and the series it is, or names."""

    path: Path
    sop_class: str  # SOPClassUID
    kind: ObjectKind  # "DICOM SEG", "RTSTRUCT", "image" (has pixel data / frames), "other"
    series_uid: str  # its own SeriesInstanceUID ("" when absent)
    frame_of_reference_uid: str  # FrameOfReferenceUID ("" when absent)
    referenced_series: tuple[str, ...]  # SeriesInstanceUIDs a SEG or RTSTRUCT names
    referenced_frames: tuple[str, ...]  # frames of reference an RTSTRUCT names

    @property
    def sop_name(self) -> str:
        """``Segmentation Storage`` (pydicom's name of the SOP class), or the UID."""
        from pydicom.uid import UID

        name = UID(self.sop_class).name if self.sop_class else ""
        return name or self.sop_class or "no SOPClassUID"

    @property
    def is_segmentation(self) -> bool:
        return self.kind in ("DICOM SEG", "RTSTRUCT")


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` is a file with the DICOM Part 10 preamble, or named ``*.dcm``."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".dcm":
        return True
    with path.open("rb") as handle:
        head = handle.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def dicom_object(path: Path) -> DicomObject:
    """Read what a DICOM file is from its header (no pixel data)."""
    import pydicom  # only for DICOM files
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise InputError(
            f"DICOM file {path} cannot be read ({exc}); copy it again, or leave it out"
        ) from None
    sop = str(ds.get("SOPClassUID", ""))
    kind = _KINDS.get(sop) or ("image" if "Rows" in ds or "NumberOfFrames" in ds else "other")
    series: list[str] = []
    frames: list[str] = []
    for item in ds.get("ReferencedSeriesSequence") or []:  # SEG: Common Instance Reference
        series.append(str(item.get("SeriesInstanceUID", "")))
    for frame in ds.get("ReferencedFrameOfReferenceSequence") or []:  # RTSTRUCT
        frames.append(str(frame.get("FrameOfReferenceUID", "")))
        for study in frame.get("RTReferencedStudySequence") or []:
            for item in study.get("RTReferencedSeriesSequence") or []:
                series.append(str(item.get("SeriesInstanceUID", "")))
    return DicomObject(
        path=path,
        sop_class=sop,
        kind=kind,
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        referenced_series=tuple(dict.fromkeys(uid for uid in series if uid)),
        referenced_frames=tuple(dict.fromkeys(uid for uid in frames if uid)),
    )


def find_dicom_mask(path: Path) -> DicomObject | None:
    """The SEG or RTSTRUCT a manifest's ``mask`` names: the file itself, or the one such
    file in a folder of DICOM files; None when the path is not DICOM (a NIfTI, a folder
    of mask files), which the other mask readers take.

    A DICOM file that is not a SEG or RTSTRUCT, a folder with none, or with several,
    is an :class:`InputError` saying what was found.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if any(region_name(p) is not None for p in files):
            return None  # a folder of mask files
        dicom = [dicom_object(p) for p in files if is_dicom_file(p)]
        if not dicom:
            return None  # the mask-folder reader says what the folder lacks
        found = [d for d in dicom if d.is_segmentation]
        if len(found) == 1:
            return found[0]
        listing = ", ".join(f"{d.path.name} ({d.kind if d.is_segmentation else d.sop_name})"
                            for d in (found or dicom)[:10])  # fmt: skip
        if not found:
            raise InputError(
                f"mask folder {path} holds {len(dicom)} DICOM file(s) but no DICOM SEG or "
                f"RTSTRUCT ({listing}); give the folder or file of the segmentation"
            )
        raise InputError(
            f"mask folder {path} holds {len(found)} segmentation objects ({listing}); give the "
            "file of the one to read as the row's `mask`"
        )
    if not is_dicom_file(path):
        return None
    found_object = dicom_object(path)
    if not found_object.is_segmentation:
        raise InputError(
            f"mask file {path} is a DICOM {found_object.sop_name} ({found_object.sop_class}), "
            "not a segmentation; a DICOM mask is a DICOM SEG (Segmentation Storage) or an "
            "RTSTRUCT (RT Structure Set Storage): give that file, or a NIfTI label map"
        )
    return found_object


def check_reference(
    found: DicomObject, image: Volume, on_grid: bool, mask_resample: MaskResample
) -> None:
    """The segmentation was drawn on this image, or may be used with it.

    It names another image when the image's SeriesInstanceUID is not among the
    series it references, or their FrameOfReferenceUIDs differ (UIDs that are
    absent or empty on either side are not compared; a NIfTI, NRRD or MetaImage
    image has none). Such a segmentation is a :class:`GeometryError` naming both
    series and frames of reference, unless it lies on the image's grid
    (``on_grid``: every SEG voxel on an image voxel, every RTSTRUCT contour on an
    image slice) and ``--mask-resample nearest`` allows a mask of another grid.
    """
    identity = image.identity
    if identity is None:
        return
    frames = {found.frame_of_reference_uid, *found.referenced_frames} - {""}
    other_series = bool(
        identity.series_uid
        and found.referenced_series
        and identity.series_uid not in found.referenced_series
    )
    other_frame = bool(
        identity.frame_of_reference_uid and frames and identity.frame_of_reference_uid not in frames
    )
    if not (other_series or other_frame) or (on_grid and mask_resample == "nearest"):
        return
    named = ", ".join(found.referenced_series) or "none named"
    raise GeometryError(
        f"{found.kind} {found.path} was drawn on another image: it references series {named} "
        f"(frame of reference {', '.join(sorted(frames)) or 'not given'}), the image "
        f"{image.path} is series {identity.series_uid or '<empty>'} (frame of reference "
        f"{identity.frame_of_reference_uid or '<empty>'}); give the image it references in "
        "the manifest"
        + (
            ", or --mask-resample nearest to use it on this image, whose grid it lies on"
            if on_grid
            else " (it does not lie on this image's grid either)"
        )
    )


def pick_named(
    available: Sequence[tuple[int, str]], names: Sequence[str], where: str, field: str
) -> list[int]:
    """Positions in ``available`` ((number, name) of each segment or ROI, in file order)
    of the regions ``names`` (every one when empty), each name once and not reserved.

    ``where`` names the object (``DICOM SEG path``) and ``field`` the tag that names
    its regions (``SegmentLabel``, ``ROIName``) in messages.
    """
    counts = Counter(name for _, name in available)
    listing = ", ".join(repr(name) for _, name in available) or "none"
    picked: list[int] = []
    for name in list(names) or list(counts):
        if name not in counts:
            raise RegionError(
                f"{where} has no region {name!r}; regions ({field}): {listing}; fix the region "
                "names (`labels`) in the manifest or --labels"
            )
        if name == BACKGROUND:
            raise InputError(
                f"{where}: the {field} {BACKGROUND!r} is reserved for the voxels in no region; "
                "leave it out of the labels, or rename it in the tool that wrote the file"
            )
        numbers = [number for number, other in available if other == name]
        if len(numbers) > 1:
            raise InputError(
                f"{where}: {len(numbers)} regions (numbers {numbers}) share the {field} "
                f"{name!r}, so the name does not say which one; rename them in the tool that "
                "wrote the file"
            )
        picked.append(next(n for n, (_, other) in enumerate(available) if other == name))
    return picked
