"""Read NRRD (.nrrd, .nhdr) and MetaImage (.mha, .mhd) volumes with SimpleITK.

The header is read first (``ImageFileReader.ReadImageInformation``): size,
shape and components are checked before any voxel is read. Files whose axes
beyond the third all have length 1 (``x, y, z, 1``) are 3D volumes; a real
4D series is refused. An image becomes float32 (HU as stored: these formats
carry no rescale tags); a label map keeps its integer type, and a float label
map must hold whole numbers (the NIfTI reader's rule).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cohort.config import PreprocessConfig
from cohort.errors import GeometryError, InputError
from cohort.inputs.nifti import as_labels, check_shape
from cohort.inputs.volume import Volume, fmt_shape, volume_from_sitk

if TYPE_CHECKING:
    import SimpleITK as sitk  # noqa: N813 (the name SimpleITK's own documentation uses)

__all__ = [
    "ITK_SUFFIXES",
    "header_reader",
    "is_itk_file",
    "itk_error_reason",
    "open_itk",
    "read_itk_header",
    "read_itk_image",
    "read_itk_label_map",
]

# file name ending -> (format name for messages, the ITK ImageIO that reads it)
ITK_SUFFIXES: dict[str, tuple[str, str]] = {
    ".nrrd": ("NRRD", "NrrdImageIO"),
    ".nhdr": ("NRRD", "NrrdImageIO"),
    ".mha": ("MetaImage", "MetaImageIO"),
    ".mhd": ("MetaImage", "MetaImageIO"),
}
_MAX_VOXELS = PreprocessConfig.max_voxels
_ITK_OBJECT = re.compile(r"^\s*\w+\(0x[0-9a-fA-F]+\):\s*")


def is_itk_file(path: Path) -> bool:
    """Whether the file name ends in one of :data:`ITK_SUFFIXES` (any letter case)."""
    return Path(path).suffix.lower() in ITK_SUFFIXES


def itk_error_reason(exc: RuntimeError) -> str:
    """The reason in a SimpleITK exception, without source paths and object addresses."""
    text = str(exc)
    for marker in ("ITK ERROR:", "itk::ERROR:", "sitk::ERROR:"):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    text = _ITK_OBJECT.sub("", text, count=1)  # "NrrdImageIO(0x55...): reason" -> "reason"
    text = text.rsplit("[nrrd]", 1)[-1]  # teem's chain of callers: the last one says what
    lines = [line.strip() for line in text.splitlines()]
    kept = [line for line in lines if line and line != "Reason: Success"]  # errno 0 says nothing
    return " ".join(kept) or type(exc).__name__


def header_reader(path: Path, image_io: str, what: str, fix: str) -> sitk.ImageFileReader:
    """A reader of ``path`` through ITK's ``image_io`` with the header read; an
    InputError says ``what`` failed, ITK's reason and the ``fix`` otherwise."""
    import SimpleITK as sitk  # noqa: N813 (here: a NIfTI-only run never imports it)

    reader = sitk.ImageFileReader()
    reader.SetImageIO(image_io)
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{what} ({itk_error_reason(exc)}); {fix}") from None
    return reader


def read_itk_header(path: Path, role: str, max_voxels: int = _MAX_VOXELS) -> sitk.ImageFileReader:
    """Open a NRRD/MetaImage file and check its header; no voxel data are read.

    ``role`` names the file in messages ("image", "mask"). Returns the reader,
    ready for ``Execute()``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"{role} file {path} does not exist or is not a file; fix the path in the manifest"
        )
    if not is_itk_file(path):
        raise InputError(
            f"{role} file {path} does not end in {', '.join(ITK_SUFFIXES)}; give a NRRD or "
            "MetaImage file with its usual extension, or convert it to NIfTI"
        )
    fmt, image_io = ITK_SUFFIXES[path.suffix.lower()]
    reader = header_reader(
        path, image_io, f"{role} file {path} is not a readable {fmt} file",
        "export it again, or convert it to NIfTI",
    )  # fmt: skip
    shape = tuple(int(n) for n in reader.GetSize())
    components = int(reader.GetNumberOfComponents())
    if components != 1:
        fix = (
            "it is a 3D Slicer segmentation: give it as a mask, where it is read by segment"
            if path.name.lower().endswith(".seg.nrrd")
            else "save one component per file (a 3D Slicer segmentation must be named .seg.nrrd)"
        )
        raise GeometryError(
            f"{role} file {path} has {components} values per voxel (a vector or multi-layer "
            f"{fmt} file, shape {fmt_shape(shape)}); cohort needs one value per voxel: {fix}"
        )
    check_shape(shape, path, role, max_voxels)  # the header's size, before any voxel is read
    return reader


def _execute(reader: sitk.ImageFileReader, path: Path, role: str) -> sitk.Image:
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(
            f"{role} file {path}: the header is readable but the voxel data are not "
            f"({itk_error_reason(exc)}); the file (or its data file) is probably missing, "
            "truncated or corrupt: copy or export it again"
        ) from None


def open_itk(path: Path, role: str, max_voxels: int, *, labels: bool) -> Callable[[], Volume]:
    """Check a NRRD/MetaImage header now; the returned function reads the voxels.

    An image reads as float32 (values as stored, HU); a label map keeps its
    integer type, and a float label map must hold whole numbers (they become
    int64), else :class:`InputError` with the count and an example.
    """
    import SimpleITK as sitk  # noqa: N813

    path = Path(path)
    reader = read_itk_header(path, role, max_voxels)
    fmt = ITK_SUFFIXES[path.suffix.lower()][0]
    if not labels:
        reader.SetOutputPixelType(sitk.sitkFloat32)

    def read() -> Volume:
        kind = "label map" if labels else "image"
        volume = volume_from_sitk(_execute(reader, path, role), path, f"{fmt} {kind} {path.name}")
        return dataclasses.replace(volume, data=as_labels(volume.data, path)) if labels else volume

    return read


def read_itk_image(path: Path, *, max_voxels: int = _MAX_VOXELS) -> Volume:
    """Read a NRRD/MetaImage image as a float32 :class:`Volume` (values as stored, HU)."""
    return open_itk(path, "image", max_voxels, labels=False)()


def read_itk_label_map(path: Path, *, max_voxels: int = _MAX_VOXELS) -> Volume:
    """Read a NRRD/MetaImage label map as an integer :class:`Volume`."""
    return open_itk(path, "mask", max_voxels, labels=True)()
