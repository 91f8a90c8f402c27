"""Read NIfTI volumes with nibabel: the header first, the voxels on demand.

:func:`open_nifti` parses and checks the header (size limit, 3D shape; a 4D
file whose extra axes all have length 1 is 3D; where the grid lies) without
reading any voxel; :func:`read_nifti` then reads the data: float32 HU after
``scl_slope`` / ``scl_inter`` for an image (the stored integers themselves when
they are HU as stored: an integer type with slope 1 and intercept 0), the stored
integers for a label map. A loader that has read the file's bytes already (to
hash them) opens it from those bytes (``raw``): the gzip stream is then decoded
whole by ISA-L's igzip (``isal``, 2-3x zlib's speed, the same bytes) and stored
values that need no scaling are a read-only view of the decoded bytes
(:func:`stored_view`), so the file is read once and its voxels copied never.

Where the grid lies (:func:`nifti_affine`) is read as ITK reads it (SimpleITK,
ITK-SNAP, 3D Slicer, nnU-Net's SimpleITK I/O; checked against SimpleITK 2.5 /
ITK 5.4), not as nibabel's ``img.affine`` does, which prefers the sform
whenever its code is set. A NIfTI header can hold two transforms, the qform
(rotation, voxel sizes, offset) and the sform (a 3x4 matrix), each with a code:

- only one code set: that transform (both readers agree);
- both set: ITK takes the sform when its code is 1 (scanner) and it is a
  rotation with voxel sizes, else the qform; nibabel always the sform. When the
  two place the grid's corner voxels further apart than the tolerance (1e-3 mm),
  the file means two things and is refused, naming both;
- both codes 0: no orientation at all (nibabel invents one from the voxel
  sizes, ITK puts the grid at the origin): refused;
- ``xyzt_units`` in metres or microns scales the grid to millimetres (ITK does;
  nibabel's affine ignores it); unknown units are millimetres.
"""

from __future__ import annotations

import io
import math
import zlib
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from isal import igzip, isal_zlib
from nibabel.arrayproxy import ArrayProxy
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from cohort.errors import GeometryError, InputError
from cohort.inputs.volume import Volume, corner_distance, fmt_affine, fmt_shape

__all__ = [
    "NIFTI_SUFFIXES",
    "as_labels",
    "check_shape",
    "is_nifti_file",
    "nifti_affine",
    "nifti_from_bytes",
    "open_nifti",
    "read_nifti",
    "squeezed_shape",
    "stored_is_scaled",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
READ_ERRORS = (
    ImageFileError,
    HeaderDataError,
    OSError,
    EOFError,
    zlib.error,
    cast(type[Exception], isal_zlib.error),  # igzip's corrupt-stream error (an Exception)
    ValueError,
)
_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI2_SIZES = (540, 540 << 24)  # sizeof_hdr of a NIfTI-2 header, either byte order
TOLERANCE_MM = 1e-3  # = PreprocessConfig.affine_tolerance_mm (a test checks)
_UNITS_MM = {"unknown": 1.0, "mm": 1.0, "meter": 1000.0, "micron": 1e-3}
_CODES = {0: "unknown", 1: "scanner", 2: "aligned", 3: "talairach", 4: "mni", 5: "template"}
_ORTHONORMAL = 1e-4  # ITK's own tolerance on the direction cosines of an sform


def is_nifti_file(path: Path) -> bool:
    """Whether the file name ends in ``.nii`` or ``.nii.gz`` (any letter case)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def open_nifti(
    path: Path,
    role: str,
    max_voxels: int,
    tolerance_mm: float = TOLERANCE_MM,
    raw: bytes | None = None,
) -> nib.Nifti1Image:
    """Open a NIfTI header (no voxel data) and check its shape, size and where its grid
    lies (:func:`nifti_affine`).

    ``role`` names the file in messages ("image", "mask"). ``raw``: the file's
    bytes, already read (the voxels are then decoded from them, by igzip when
    gzipped); else the file is opened by nibabel.
    """
    path = Path(path)
    if raw is None and not path.is_file():
        raise InputError(
            f"{role} file {path} does not exist or is not a file; fix the path in the manifest"
        )
    try:
        img = nib.load(path, mmap=False) if raw is None else nifti_from_bytes(raw)
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
    nifti_affine(img, path, role, tolerance_mm)
    return img


def nifti_from_bytes(raw: bytes) -> nib.Nifti1Image:
    """A NIfTI-1 or -2 image over a file's bytes (``.nii`` or gzipped ``.nii.gz``); only
    its header is parsed now (through igzip for a gzip stream), and its voxels are
    decoded when read (:func:`read_data`, given the same bytes)."""
    stream: io.BufferedIOBase = io.BytesIO(raw)
    if raw[:2] == _GZIP_MAGIC:
        stream = igzip.GzipFile(fileobj=stream, mode="rb")
    head = stream.read(4)
    stream.seek(0)
    sizeof_hdr = int.from_bytes(head, "little") if len(head) == 4 else 0
    klass = nib.Nifti2Image if sizeof_hdr in _NIFTI2_SIZES else nib.Nifti1Image
    return klass.from_stream(stream)


def nifti_affine(
    img: nib.Nifti1Image, path: Path, role: str = "image", tolerance_mm: float = TOLERANCE_MM
) -> np.ndarray:
    """The voxel -> RAS+ mm affine of a NIfTI header, as ITK reads it (module docstring).

    Raises :class:`GeometryError` naming the file when the header has no orientation
    or when its qform and sform disagree by more than ``tolerance_mm`` at the grid's
    corner voxels.
    """
    header = img.header
    shape = squeezed_shape(tuple(int(n) for n in img.shape))
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    units = header.get_xyzt_units()[0]
    scale = np.diag([_UNITS_MM.get(units, 1.0)] * 3 + [1.0])
    if qcode == 0 and scode == 0:
        raise GeometryError(
            f"{role} file {path} has no orientation: its qform_code and sform_code are both "
            "0, so where its voxels lie is unknown (nibabel would place the grid by its voxel "
            "sizes alone, ITK at the origin); export it again from the scanner's DICOM (e.g. "
            "with dcm2niix), or set its qform/sform to the orientation you know"
        )
    qform = scale @ np.asarray(header.get_qform(), dtype=np.float64)
    sform = scale @ np.asarray(header.get_sform(), dtype=np.float64)
    if scode == 0:
        return qform
    if qcode == 0:
        _check_orthogonal(sform, path, role)
        return _sform_as_itk(sform, header, scale, shape, path, role, tolerance_mm)
    distance = corner_distance(shape, qform, sform)
    if not distance <= tolerance_mm:
        raise GeometryError(
            f"{role} file {path} places its grid in two ways: its qform (code {qcode}, "
            f"{_CODES.get(qcode, '?')}) and its sform (code {scode}, {_CODES.get(scode, '?')}) "
            f"are up to {distance:.4g} mm apart at the grid's corners (tolerance "
            f"{tolerance_mm:g} mm): qform {_placement(qform)}, sform {_placement(sform)} "
            "(RAS+ mm); ITK-based tools (SimpleITK, ITK-SNAP, 3D Slicer, nnU-Net) read "
            f"the {'sform' if _itk_prefers_sform(scode, sform) else 'qform'} of this file "
            "and nibabel the sform, so which one is meant is not known; make the two agree "
            "with the one that is right for the scan (e.g. fslorient -copyqform2sform or "
            "-copysform2qform, or nibabel's set_sform / set_qform), then run again"
        )
    if _itk_prefers_sform(scode, sform):
        return _sform_as_itk(sform, header, scale, shape, path, role, tolerance_mm)
    return qform


def _sform_as_itk(
    sform: np.ndarray,
    header: nib.Nifti1Header,
    scale: np.ndarray,
    shape: tuple[int, ...],
    path: Path,
    role: str,
    tolerance_mm: float,
) -> np.ndarray:
    """The sform as ITK reads it: its directions and origin, but the voxel sizes of the
    header's ``pixdim`` (nibabel takes the sform's own column lengths). Refused when the
    two place the grid's corners further apart than ``tolerance_mm``."""
    pixdim = np.abs(np.asarray(header["pixdim"][1:4], dtype=np.float64)) * scale[0, 0]
    columns = sform[:3, :3] / np.linalg.norm(sform[:3, :3], axis=0)
    itk = sform.copy()
    itk[:3, :3] = columns * pixdim
    distance = corner_distance(shape, sform, itk)
    if not distance <= tolerance_mm:
        sizes = ", ".join(f"{v:.6g}" for v in np.linalg.norm(sform[:3, :3], axis=0))
        raise GeometryError(
            f"{role} file {path} has an sform whose voxel sizes ({sizes} mm) are not the "
            f"header's pixdim ({', '.join(f'{v:.6g}' for v in pixdim)} mm): nibabel places the "
            "grid by the former and ITK-based tools by the latter, up to "
            f"{distance:.4g} mm apart at its corners; write the file again with pixdim equal "
            "to the sform's voxel sizes (nibabel: header.set_zooms), then run again"
        )
    return itk


def _itk_prefers_sform(scode: int, sform: np.ndarray) -> bool:
    """ITK 5.4's choice when both codes are set: a scanner sform that is a rotation with
    voxel sizes."""
    return scode == 1 and _orthogonal(sform)


def _orthogonal(affine: np.ndarray) -> bool:
    columns = affine[:3, :3]
    norms = np.linalg.norm(columns, axis=0)
    if not np.all(norms > 0):
        return False
    unit = columns / norms
    return bool(np.allclose(unit.T @ unit, np.eye(3), atol=_ORTHONORMAL))


def _check_orthogonal(sform: np.ndarray, path: Path, role: str) -> None:
    if not _orthogonal(sform):
        raise GeometryError(
            f"{role} file {path} has an sform whose axes are not orthogonal (a sheared grid: "
            f"{fmt_affine(sform)}), which ITK-based tools refuse too; resample it onto an "
            "orthogonal grid (e.g. a DICOM series with gantry tilt, converted with dcm2niix's "
            "tilt correction)"
        )


def _placement(affine: np.ndarray) -> str:
    """Origin and axis directions of an affine, for messages."""
    columns = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    origin = ", ".join(f"{v:.4g}" for v in np.round(affine[:3, 3], 4) + 0.0)
    axes = "; ".join(", ".join(f"{v:.4g}" for v in np.round(c, 4) + 0.0) for c in columns.T)
    return f"origin ({origin}), axes [{axes}]"


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


def read_data(
    img: nib.Nifti1Image, path: Path, role: str, as_float: bool, raw: bytes | None = None
) -> np.ndarray:
    """Read the voxel data as a 3D array: HU after scl_slope/scl_inter (float32, or the
    stored integers when the scaling is the identity), or as stored.

    ``raw``: the file's bytes, which ``img`` was opened from. Stored values that need
    no scaling are then a read-only view of the decoded bytes (:func:`stored_view`:
    the same array nibabel makes, without its zero-filled buffer and copy)."""
    try:
        scaled = stored_is_scaled(img)
        if as_float and not scaled:
            as_float = not np.issubdtype(img.get_data_dtype(), np.integer)
        if as_float:
            data = img.get_fdata(dtype=np.float32)
        elif raw is not None and not scaled and isinstance(img.dataobj, ArrayProxy):
            data = stored_view(img.dataobj, raw)
        else:
            data = np.asarray(img.dataobj)
    except (*READ_ERRORS, TypeError) as exc:
        raise InputError(
            f"{role} file {path}: the header is readable but the voxel data are not "
            f"({type(exc).__name__}: {exc}); the file is probably truncated or corrupt, "
            "copy or export it again"
        ) from None
    return data.reshape(squeezed_shape(data.shape))


def stored_view(proxy: ArrayProxy, raw: bytes) -> np.ndarray:
    """The stored voxels of an image opened from the file's bytes ``raw``, unscaled: a
    read-only array over the decoded bytes (:func:`gunzip` for a gzip stream)."""
    shape = tuple(int(n) for n in proxy.shape)
    count = math.prod(shape)
    decoded = gunzip(raw) if raw[:2] == _GZIP_MAGIC else raw
    offset = int(proxy.offset)
    needed = offset + count * proxy.dtype.itemsize
    if len(decoded) < needed:
        raise EOFError(f"{len(decoded):,} bytes decoded, {needed:,} needed for the voxels")
    flat = np.frombuffer(decoded, dtype=proxy.dtype, count=count, offset=offset)
    return flat.reshape(shape, order=proxy.order)


def gunzip(raw: bytes) -> bytes:
    """A gzip stream's decoded bytes, by igzip: every member of a multi-member stream,
    and bytes after the last member ignored, as nibabel's read of the voxels and zlib's
    ``gzread`` (ITK) ignore them (``igzip.decompress`` refuses them unless they are
    zeros). Raises EOFError when the stream ends early."""
    parts, rest = [], raw
    while rest[:2] == _GZIP_MAGIC:
        member = isal_zlib.decompressobj(wbits=31)  # 16 + 15: one gzip member
        parts.append(member.decompress(rest))
        if not member.eof:
            raise EOFError("the compressed stream ends before its end-of-stream marker")
        rest = member.unused_data
    return parts[0] if len(parts) == 1 else b"".join(parts)


def stored_is_scaled(img: nib.Nifti1Image) -> bool:
    """Whether the stored values are scaled (``scl_slope`` / ``scl_inter`` other than
    1 and 0, as nibabel applies them) to give the image's values."""
    proxy = img.dataobj
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    return not (float(slope) == 1.0 and float(inter) == 0.0)


def read_nifti(
    img: nib.Nifti1Image, path: Path, role: str, *, labels: bool, raw: bytes | None = None
) -> Volume:
    """The voxels of an opened NIfTI file as a :class:`Volume`: HU (:func:`read_data`),
    or a label map. ``raw``: the bytes it was opened from, if it was."""
    path = Path(path)
    data = read_data(img, path, role, as_float=not labels, raw=raw)
    kind = "label map" if labels else "image"
    return Volume(
        data=as_labels(data, path) if labels else data,
        affine=nifti_affine(img, path, role),
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
