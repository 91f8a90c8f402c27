"""Stage "load": read an image and its mask's regions, headers checked before voxels.

One dispatch for every accepted input, by what the manifest's path is:

==========================  =====================================================
``image``                   read with
==========================  =====================================================
``*.nii``, ``*.nii.gz``     nibabel (:mod:`cohort.inputs.nifti`)
``*.nrrd``, ``*.nhdr``,     SimpleITK (:mod:`cohort.inputs.itk`)
``*.mha``, ``*.mhd``
a folder                    a DICOM series, by SimpleITK/GDCM (:mod:`cohort.inputs.dicom`);
                            ``series_uid`` picks one of several; a series that is
                            one multi-frame file is an Enhanced CT
a DICOM file (``*.dcm``,    an Enhanced CT, by highdicom (:mod:`cohort.inputs.enhanced`)
or the DICM preamble)
==========================  =====================================================

and the mask (:mod:`cohort.inputs.segmentation`): a label-map file (NIfTI,
NRRD, MetaImage: regions named ``NAME=VALUE``), a folder of binary masks
(one file per region, named by the file) or a 3D Slicer ``.seg.nrrd``
(named by segment); or, told apart by content (SOP Class UID,
:mod:`cohort.inputs.dicom_objects`), a DICOM SEG (:mod:`cohort.inputs.dicom_seg`,
named by SegmentLabel) or RTSTRUCT (:mod:`cohort.inputs.rtstruct`, named by
ROIName), as a file or a folder holding it. A SEG or RTSTRUCT is put on the
image's grid as it is read, so the image is read first. Both headers (every
file's, for a folder) are checked, size limit included, before any voxel is
read. SimpleITK, pydicom and highdicom are imported only when a file needs
them, so a NIfTI-only loader never pays for them. Nothing is reoriented here: a
:class:`VolumePair` holds both as stored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cohort.config import LabelMap, PreprocessConfig, names_only
from cohort.errors import InputError
from cohort.inputs.dicom_objects import find_dicom_mask, is_dicom_file
from cohort.inputs.itk import is_itk_file, open_itk
from cohort.inputs.nifti import open_nifti, read_nifti
from cohort.inputs.segmentation import Regions, open_regions
from cohort.inputs.volume import Volume

__all__ = ["EMPTY_SERIES_UID", "VolumePair", "load_pair", "open_dicom_regions", "open_image"]

EMPTY_SERIES_UID = "<empty>"  # a `series_uid` cell naming the series whose UID is empty


@dataclass(frozen=True, eq=False)
class VolumePair:
    """An image and its mask's regions, as stored on disk (original orientation)."""

    image: Volume  # HU: float32, or the stored integers when they are HU as stored
    regions: Regions  # a label map and its names, or named binary masks; on the mask's grid

    @property
    def image_path(self) -> Path:
        return self.image.path

    @property
    def mask_path(self) -> Path:
        return self.regions.path


def load_pair(
    image: Path,
    mask: Path,
    cfg: PreprocessConfig,
    labels: LabelMap | None = None,
    *,
    series_uid: str | None = None,
    contents: Mapping[Path, bytes] | None = None,
) -> VolumePair:
    """Read an image and its mask; every header is checked before any voxel is read.

    ``labels`` says which regions to read (a mask folder reads only their
    files) and must be of the mask's kind: NAME=VALUE for a label-map file,
    bare names for a folder or ``.seg.nrrd``. Without it a folder or
    ``.seg.nrrd`` reads every region, and a label map's values are named at
    the check stage.
    ``contents``: the bytes of files read already (by path; a NIfTI file among
    them is decoded from them instead of being read again).
    Raises :class:`InputError` (or :class:`GeometryError` for non-3D shapes)
    naming the file and the fix.
    """
    contents = contents or {}
    image, mask = Path(image), Path(mask)
    read_image = open_image(image, cfg.max_voxels, series_uid, raw=contents.get(image))
    read_onto = open_dicom_regions(mask, labels, cfg)
    if read_onto is not None:
        volume = read_image()
        return VolumePair(image=volume, regions=read_onto(volume))
    read_regions = open_regions(
        mask,
        () if labels is None else labels,  # (): every region; a label map's names come later
        max_voxels=cfg.max_voxels,
        affine_tolerance_mm=cfg.affine_tolerance_mm,
        raw=contents.get(mask),
    )
    return VolumePair(image=read_image(), regions=read_regions())


def open_image(
    path: Path, max_voxels: int, series_uid: str | None = None, raw: bytes | None = None
) -> Callable[[], Volume]:
    """Check an image's header(s) now; the returned function reads its voxels (HU).
    ``raw``: the bytes of a NIfTI file, read already."""
    path = Path(path)
    if path.is_dir():
        from cohort.inputs.dicom import open_dicom_series  # GDCM only for DICOM folders

        uid = "" if series_uid == EMPTY_SERIES_UID else series_uid
        return open_dicom_series(path, uid, max_voxels=max_voxels)
    if series_uid is not None:
        raise InputError(
            f"image {path} has a `series_uid` ({series_uid!r}) in the manifest, which picks a "
            "series of a DICOM folder, but the image is not a folder; give the folder that "
            "holds the series, or leave the row's `series_uid` blank"
        )
    if is_itk_file(path):
        return open_itk(path, "image", max_voxels, labels=False)
    if is_dicom_file(path):
        from cohort.inputs.enhanced import open_enhanced  # pydicom only for DICOM files

        return open_enhanced(path, max_voxels=max_voxels)
    img = open_nifti(path, "image", max_voxels, raw=raw)  # any other name: NIfTI, or an error
    return lambda: read_nifti(img, path, "image", labels=False, raw=raw)


def open_dicom_regions(
    mask: Path, labels: LabelMap | None, cfg: PreprocessConfig
) -> Callable[[Volume], Regions] | None:
    """For a mask that is a DICOM SEG or RTSTRUCT (a file, or a folder holding one):
    check its header and ``labels`` (bare names) now, and return the function that
    puts its regions on the image's grid; None for any other mask."""
    if not (mask.is_dir() or is_dicom_file(mask)):
        return None
    found = find_dicom_mask(mask)
    if found is None:
        return None
    if labels and not names_only(labels):
        given = ",".join(name if value is None else f"{name}={value}" for name, value in labels)
        field = "SegmentLabel" if found.kind == "DICOM SEG" else "ROIName"
        raise InputError(
            f"{found.kind} {found.path} names its regions by {field}, but the labels {given!r} "
            "are NAME=VALUE pairs, which name the values of a label-map file; give the region "
            f"names bare in --labels or the row's `labels` (e.g. "
            f"{','.join(name for name, _ in labels)!r})"
        )
    names = [name for name, _ in labels or ()]
    if found.kind == "DICOM SEG":
        from cohort.inputs.dicom_seg import open_seg

        return open_seg(
            found,
            names,
            mask_resample=cfg.mask_resample,
            max_voxels=cfg.max_voxels,
            affine_tolerance_mm=cfg.affine_tolerance_mm,
        )
    from cohort.inputs.rtstruct import open_rtstruct

    return open_rtstruct(found, names, mask_resample=cfg.mask_resample, max_voxels=cfg.max_voxels)
