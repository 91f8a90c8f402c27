"""DICOM objects made from the real ct-dicom-20 series, for the tests of SEG, RTSTRUCT
and Enhanced CT input.

Everything is written into a folder the caller gives (a tmp_path), from the
series read in place:

- :func:`cropped_series`: the 20 slices cropped in-plane to 64 x 64 (so a model
  pass stays quick), decompressed, with the UIDs the anonymised files lack;
- :func:`enhanced_ct`: the same slices as one Legacy Converted Enhanced CT
  (highdicom), frames in the order given;
- :func:`label_map_of`: two regions drawn on the image by thresholds (a label map
  in the series' (column, row, slice) order);
- :func:`write_seg`: the regions as a DICOM SEG (highdicom);
- :func:`write_rtstruct`: closed planar contours as an RTSTRUCT (pydicom);
- :func:`boundary_contours`: a label map's boundaries as contours, traced by
  contourpy's marching squares at the 0.5 level (the way contouring tools export).

UIDs are derived from fixed strings, so every run writes the same files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

SERIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct-dicom-20"
CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")
RTSTRUCT = UID("1.2.840.10008.5.1.4.1.1.481.3")
ROWS = slice(270, 334)  # rows and columns of the crop: vertebra, aorta, psoas, kidney edge
COLUMNS = slice(215, 279)
NAMES = ("bone", "soft")  # label 1, label 2 of label_map_of

Contour = np.ndarray  # (n, 3) points, LPS mm
Rois = Mapping[str, Sequence[Contour]]


def uid(name: str) -> UID:
    """A UID derived from ``name`` alone (pydicom's root, a hash of the name)."""
    return generate_uid(entropy_srcs=["cohort-tests", name])


def cropped_series(
    target: Path,
    *,
    series: str = "series",
    frame_of_reference: str = "for",
    rows: slice = ROWS,
    columns: slice = COLUMNS,
) -> list[Dataset]:
    """Write the cropped, decompressed series into ``target``; return its datasets in
    position order (inferior first). ``series`` and ``frame_of_reference`` name the UIDs;
    ``rows`` and ``columns`` the crop (``slice(None)``: the whole 512 x 512)."""
    rows = slice(rows.start or 0, rows.stop)
    columns = slice(columns.start or 0, columns.stop)
    target.mkdir(parents=True, exist_ok=True)
    out: list[Dataset] = []
    for path in sorted(SERIES.glob("CT.*")):
        ds: Dataset = pydicom.dcmread(path)
        pixels = np.ascontiguousarray(ds.pixel_array[rows, columns])
        iop = np.array(ds.ImageOrientationPatient, dtype=np.float64)
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        ipp = np.array(ds.ImagePositionPatient, dtype=np.float64)
        ipp = ipp + columns.start * column_spacing * iop[:3] + rows.start * row_spacing * iop[3:]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CT_IMAGE
        ds.SOPInstanceUID = uid(f"{series}/{path.name}")
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID = uid("study")
        ds.SeriesInstanceUID = uid(series)
        ds.FrameOfReferenceUID = uid(frame_of_reference)
        ds.PatientID = "cohort-test"
        ds.PatientName = "Test^Cohort"
        ds.AccessionNumber = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = 1
        ds.save_as(target / f"{path.name}.dcm", enforce_file_format=True)
        out.append(ds)
    out.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    for number, ds in enumerate(out, start=1):
        ds.InstanceNumber = number
    return out


def enhanced_ct(datasets: Sequence[Dataset], path: Path, *, name: str = "enhanced") -> Path:
    """One Legacy Converted Enhanced CT from single-frame datasets, frames in their order."""
    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=list(datasets),
        series_instance_uid=uid(f"{name}-series"),
        series_number=2,
        sop_instance_uid=uid(name),
        instance_number=1,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save_as(path)
    return path


def hu_volume(datasets: Sequence[Dataset]) -> np.ndarray:
    """HU in (column, row, slice) order, datasets already in slice order."""
    return np.stack(
        [
            (ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).T
            for ds in datasets
        ],
        axis=-1,
    )


def label_map_of(datasets: Sequence[Dataset]) -> np.ndarray:
    """Label 1 (bone): HU above 200; label 2 (soft): 20 to 80 HU in the crop's posterior
    half; (column, row, slice) order, uint8."""
    hu = hu_volume(datasets)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    posterior = np.zeros(hu.shape, dtype=bool)
    posterior[:, hu.shape[1] // 2 :, :] = True
    labels[(hu > 20) & (hu < 80) & posterior] = 2
    labels[hu > 200] = 1
    return labels


def affine_lps(datasets: Sequence[Dataset]) -> np.ndarray:
    """(column, row, slice, 1) -> LPS mm of datasets in slice order."""
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=np.float64)
    row_spacing, column_spacing = (float(v) for v in datasets[0].PixelSpacing)
    first = np.array(datasets[0].ImagePositionPatient, dtype=np.float64)
    last = np.array(datasets[-1].ImagePositionPatient, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * column_spacing
    affine[:3, 1] = iop[3:] * row_spacing
    affine[:3, 2] = (last - first) / (len(datasets) - 1)
    affine[:3, 3] = first
    return affine


def write_seg(
    datasets: Sequence[Dataset],
    masks: Mapping[str, np.ndarray],
    path: Path,
    *,
    name: str = "seg",
    fractional: bool = False,
) -> Path:
    """A DICOM SEG of ``masks`` (name -> (column, row, slice) bool or [0, 1] float arrays,
    on the datasets' grid, datasets in any order): one segment per mask, labelled by its
    name, empty frames left out (highdicom's default)."""
    order = sorted(range(len(datasets)), key=lambda n: float(datasets[n].ImagePositionPatient[2]))
    rank = {n: order.index(n) for n in range(len(datasets))}
    frames = np.stack(
        [
            np.stack([np.asarray(mask)[:, :, rank[n]].T for mask in masks.values()], axis=-1)
            for n in range(len(datasets))
        ]
    )  # (frames in the datasets' order, rows, columns, segments)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number, label in enumerate(masks, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=list(datasets),
        pixel_array=frames.astype(np.float32 if fractional else np.uint8),
        segmentation_type=(
            hd.seg.SegmentationTypeValues.FRACTIONAL
            if fractional
            else hd.seg.SegmentationTypeValues.BINARY
        ),
        segment_descriptions=descriptions,
        series_instance_uid=uid(f"{name}-series"),
        series_number=3,
        sop_instance_uid=uid(name),
        instance_number=1,
        manufacturer="cohort tests",
        manufacturer_model_name="dicom_objects.py",
        software_versions="1",
        device_serial_number="1",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def boundary_contours(mask: np.ndarray, affine: np.ndarray) -> list[Contour]:
    """The boundaries of a (column, row, slice) bool mask as closed planar contours in
    LPS mm: contourpy's marching squares at level 0.5, slice by slice (holes are contours
    of their own)."""
    import contourpy

    contours: list[Contour] = []
    for k in range(mask.shape[2]):
        plane = mask[:, :, k].astype(np.float64)
        if not plane.any():
            continue
        padded = np.pad(plane, 1)  # closed lines round regions that touch the edge
        lines = contourpy.contour_generator(z=padded.T, name="serial").lines(0.5)
        for line in lines:
            xy = np.asarray(line, dtype=np.float64)[:-1] - 1.0  # (column, row); drop the repeat
            index = np.column_stack([xy, np.full(len(xy), k), np.ones(len(xy))])
            contours.append((affine @ index.T).T[:, :3])
    return contours


def write_rtstruct(
    datasets: Sequence[Dataset],
    rois: Rois,
    path: Path,
    *,
    name: str = "rtstruct",
    series: str | None = None,
) -> Path:
    """An RTSTRUCT with one ROI per entry of ``rois`` (closed planar contours, LPS mm),
    referencing the datasets' series (or the series UID ``series``)."""
    first = datasets[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT
    meta.MediaStorageSOPInstanceUID = uid(name)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = RTSTRUCT
    ds.SOPInstanceUID = uid(name)
    ds.Modality = "RTSTRUCT"
    ds.StudyInstanceUID = first.StudyInstanceUID
    ds.SeriesInstanceUID = uid(f"{name}-series")
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PatientID, ds.PatientName = first.PatientID, first.PatientName
    ds.StructureSetLabel = "cohort-tests"
    ds.StructureSetDate, ds.StructureSetTime = "20260101", "000000"

    contour_images = DicomSequence()
    for image in datasets:
        item = Dataset()
        item.ReferencedSOPClassUID = image.SOPClassUID
        item.ReferencedSOPInstanceUID = image.SOPInstanceUID
        contour_images.append(item)
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = series or first.SeriesInstanceUID
    referenced_series.ContourImageSequence = contour_images
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study.RTReferencedSeriesSequence = DicomSequence([referenced_series])
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])

    ds.StructureSetROISequence = DicomSequence()
    ds.ROIContourSequence = DicomSequence()
    ds.RTROIObservationsSequence = DicomSequence()
    for number, (roi_name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
        roi.ROIName = roi_name
        roi.ROIGenerationAlgorithm = "MANUAL"
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ROIDisplayColor = [255, 0, 0]
        if contours:
            item.ContourSequence = DicomSequence()
            for points in contours:
                contour = Dataset()
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(points)
                contour.ContourData = [f"{v:.4f}" for v in np.asarray(points).ravel()]
                item.ContourSequence.append(contour)
        ds.ROIContourSequence.append(item)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "ORGAN"
        observation.ROIInterpreter = ""
        ds.RTROIObservationsSequence.append(observation)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def edit_enhanced(
    source: Path,
    target: Path,
    *,
    order: Sequence[int] | None = None,
    slopes: Mapping[int, float] | None = None,
) -> Path:
    """A copy of an uncompressed Enhanced CT with its frames in ``order`` (frame indices
    of the source) and, for ``slopes`` (frame index in the copy -> slope), a rescale of
    that frame's own in its per-frame functional groups (the others keep the shared one)."""
    ds = pydicom.dcmread(source)
    frames = ds.pixel_array  # (frames, rows, columns), stored values
    order = list(range(len(frames))) if order is None else list(order)
    groups = [ds.PerFrameFunctionalGroupsSequence[n] for n in order]
    frames = np.ascontiguousarray(frames[order])
    if slopes:
        shared = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
        for n, group in enumerate(groups):
            item = Dataset()
            item.RescaleIntercept = shared.RescaleIntercept
            item.RescaleSlope = f"{slopes.get(n, float(shared.RescaleSlope)):g}"
            item.RescaleType = shared.RescaleType
            group.PixelValueTransformationSequence = DicomSequence([item])
        del ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(groups)
    ds.PixelData = frames.tobytes()
    ds.SOPInstanceUID = uid(f"{target.name}")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target


def reorder_seg_frames(source: Path, target: Path, order: Sequence[int]) -> Path:
    """A copy of an uncompressed SEG with its frames (pixel data and per-frame functional
    groups together) in ``order``; frames must fill whole bytes (64 x 64 binary do)."""
    ds = pydicom.dcmread(source)
    size = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated)
    if size % 8:
        raise ValueError("frames do not fill whole bytes")
    data = bytes(ds.PixelData)
    step = size // 8
    frames = [data[n * step : (n + 1) * step] for n in range(int(ds.NumberOfFrames))]
    ds.PixelData = b"".join(frames[n] for n in order) + data[len(frames) * step :]
    groups = ds.PerFrameFunctionalGroupsSequence
    ds.PerFrameFunctionalGroupsSequence = DicomSequence([groups[n] for n in order])
    ds.SOPInstanceUID = uid(target.name)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(target, enforce_file_format=True)
    return target


def centre_line_contours(mask: np.ndarray, affine: np.ndarray) -> list[Contour]:
    """The boundaries of a (column, row, slice) bool mask drawn through the centres of
    its edge voxels, as exporters built on OpenCV's findContours draw them: each vertex
    of :func:`boundary_contours` (half-way between an inside and an outside centre)
    moved onto the inside centre."""
    inverse = np.linalg.inv(affine)
    out: list[Contour] = []
    for contour in boundary_contours(mask, affine):
        index = (inverse[:3, :3] @ contour.T).T + inverse[:3, 3]
        k = round(float(index[0, 2]))
        moved = []
        for u, v in index[:, :2]:
            candidates = [
                (int(a), int(b))
                for a in {np.floor(u), np.ceil(u)}
                for b in {np.floor(v), np.ceil(v)}
                if 0 <= a < mask.shape[0] and 0 <= b < mask.shape[1] and mask[int(a), int(b), k]
            ]
            a, b = min(candidates, key=lambda c: (c[0] - u) ** 2 + (c[1] - v) ** 2)
            moved.append((a, b, k, 1.0))
        points = (affine @ np.array(moved).T).T[:, :3]
        keep = np.any(np.diff(points, axis=0, append=points[:1]) != 0, axis=1)  # no repeats
        if keep.sum() >= 3:
            out.append(points[keep])
    return out


def made(root: Path) -> dict[str, Path]:
    """The usual set under ``root``: the cropped series, its label map as NIfTI, the
    same regions as SEG and as RTSTRUCT (contours through the label map's boundaries),
    and an Enhanced CT of the series. Returns their paths by name."""
    import nibabel as nib

    datasets = cropped_series(root / "series")
    labels = label_map_of(datasets)
    lps = affine_lps(datasets)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    nib.save(nib.Nifti1Image(labels, ras), root / "labels.nii.gz")
    masks = {name: labels == value for value, name in enumerate(NAMES, start=1)}
    rois = {name: boundary_contours(mask, lps) for name, mask in masks.items()}
    return {
        "series": root / "series",
        "labels": root / "labels.nii.gz",
        "seg": write_seg(datasets, masks, root / "seg.dcm"),
        "rtstruct": write_rtstruct(datasets, rois, root / "rtstruct.dcm"),
        "enhanced": enhanced_ct(datasets, root / "enhanced" / "ct.dcm"),
    }
