"""Named regions: a folder of binary masks, a 3D Slicer segmentation, or a label map.

Three ways a cohort names its structures, read to one interface: a
``select(names)`` that returns ordered ``(name, bool mask)`` pairs in stored
index order (i, j, k), with one voxel -> RAS mm affine.

- :func:`read_mask_folder`: one binary mask file per structure (NIfTI, NRRD,
  MetaImage), the region named by the file name without its extension
  (``liver.nii.gz`` -> ``liver``); every file on one grid.
- :func:`read_slicer_segmentation`: a ``.seg.nrrd``; regions named by the
  header's ``SegmentN_Name``; segment N is ``layer == SegmentN_LabelValue`` on
  layer ``SegmentN_Layer`` (segments on different layers may share a value).
- :func:`read_label_regions`: a label-map file plus a :data:`LabelMap`
  (name -> value).

Masks from separate files or layers may overlap; nothing here resolves that.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation

from cohort.config import BACKGROUND, LabelMap, PreprocessConfig, names_only
from cohort.errors import GeometryError, InputError, RegionError
from cohort.inputs.itk import header_reader, is_itk_file, itk_error_reason, open_itk
from cohort.inputs.nifti import as_labels, is_nifti_file, open_nifti, read_nifti
from cohort.inputs.volume import (
    Volume,
    axis_mapping,
    corner_distance,
    fmt_affine,
    fmt_shape,
    volume_from_sitk,
)

__all__ = [
    "MASK_SUFFIXES",
    "LabelRegions",
    "NamedMasks",
    "Regions",
    "check_label_kind",
    "is_slicer_segmentation",
    "open_label_file",
    "open_mask_folder",
    "open_regions",
    "open_slicer_segmentation",
    "present_values",
    "read_label_file",
    "read_label_regions",
    "read_mask_folder",
    "read_regions",
    "read_slicer_segmentation",
    "region_name",
    "reindexed",
]

# file endings of mask files, longest first so that ".nii.gz" wins over ".gz"-less ".nii"
MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SLICER_SUFFIX = ".seg.nrrd"
_MAX_VOXELS = PreprocessConfig.max_voxels
_TOLERANCE_MM = PreprocessConfig.affine_tolerance_mm
_SEGMENT_KEY = re.compile(r"^Segment(\d+)_(\w+)$")


@dataclass(frozen=True, eq=False)
class NamedMasks:
    """Binary masks by name, on one grid, in stored index order (i, j, k)."""

    names: tuple[str, ...]  # region names, in file-name or segment order
    masks: tuple[np.ndarray, ...]  # bool 3D arrays, one per name, same shape; may overlap
    sources: tuple[str, ...]  # where each mask came from, for messages (file, segment)
    affine: np.ndarray  # 4x4 float64 voxel -> RAS mm, shared by every mask
    path: Path  # the folder or .seg.nrrd file
    description: str  # "mask folder" or "3D Slicer segmentation"
    present: tuple[str, ...] = ()  # every region the source holds, when only some were read

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.masks) == len(self.sources):
            raise ValueError("NamedMasks needs one mask and one source per name")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"NamedMasks names repeat: {self.names}")
        shapes = {mask.shape for mask in self.masks}
        if len(shapes) > 1 or any(mask.dtype != np.bool_ or mask.ndim != 3 for mask in self.masks):
            raise ValueError("NamedMasks holds 3D bool masks of one shape")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.masks[0].shape) if self.masks else ()

    def select(self, names: Sequence[str]) -> tuple[tuple[str, np.ndarray], ...]:
        """The masks of ``names``, in that order; a missing or empty one is a RegionError."""
        index = {name: r for r, name in enumerate(self.names)}
        out: list[tuple[str, np.ndarray]] = []
        for name in names:
            if name not in index:
                raise RegionError(
                    f"{self.description} {self.path} has no region {name!r}; regions present: "
                    f"{_fmt_names(self.present or self.names)}; fix the region names "
                    "(`labels`) in the manifest"
                    + (
                        f", or add a mask file {name}.nii.gz to the folder"
                        if self.description == "mask folder"
                        else ", or rename the segment in 3D Slicer"
                    )
                )
            r = index[name]
            if not self.masks[r].any():
                raise RegionError(
                    f"region {name!r} of {self.description} {self.path} ({self.sources[r]}) "
                    "has no voxels; draw the structure, or leave it out of the region names"
                )
            out.append((name, self.masks[r]))
        return tuple(out)


@dataclass(frozen=True, eq=False)
class LabelRegions:
    """A label map and the names of its values; masks are made when selected."""

    labels: np.ndarray  # integer 3D label map, stored index order (i, j, k)
    label_map: LabelMap  # (name, value) pairs
    affine: np.ndarray  # 4x4 float64 voxel -> RAS mm
    path: Path  # the label-map file

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.label_map)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.labels.shape)

    def select(self, names: Sequence[str]) -> tuple[tuple[str, np.ndarray], ...]:
        """``labels == value`` for each of ``names``, in that order.

        A name not in the label map, or a value with no voxel, is a RegionError.
        """
        values = dict(self.label_map)
        out: list[tuple[str, np.ndarray]] = []
        for name in names:
            value = values.get(name)
            if value is None:
                raise RegionError(
                    f"label map of mask file {self.path} names no region {name!r}; names in it: "
                    f"{_fmt_names(self.names)}; add {name}=VALUE to the row's `labels` map"
                )
            mask = self.labels == value
            if not mask.any():
                raise RegionError(
                    f"mask file {self.path} has no voxel with value {value} "
                    f"(label {name!r}); values present: {present_values(self.labels)}; if this "
                    "mask numbers its labels differently, give the row a `labels` map in the "
                    "manifest (e.g. tibia=2,femur=1)"
                )
            out.append((name, mask))
        return tuple(out)


Regions = NamedMasks | LabelRegions


def reindexed(regions: Regions, ornt: np.ndarray, affine: np.ndarray) -> Regions:
    """``regions`` re-indexed by a nibabel orientation ``ornt`` (the same voxels in
    another stored axis order or direction; views, no copy) and placed by ``affine``,
    the affine of the grid they are then stored as."""
    if isinstance(regions, LabelRegions):
        return dataclasses.replace(
            regions, labels=apply_orientation(regions.labels, ornt), affine=affine
        )
    masks = tuple(apply_orientation(mask, ornt) for mask in regions.masks)
    return dataclasses.replace(regions, masks=masks, affine=affine)


def _fmt_names(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names) if names else "none"


def present_values(mask: np.ndarray, limit: int = 20) -> str:
    """The distinct values of a label map, for messages (the first ``limit``)."""
    values = np.unique(mask)
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (f", ... ({values.size} in all)" if values.size > limit else "")


def region_name(path: Path) -> str | None:
    """The region a mask file names (``liver.nii.gz`` -> ``liver``), None if not a mask file."""
    name = Path(path).name
    for suffix in MASK_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def is_slicer_segmentation(path: Path) -> bool:
    """Whether the file name ends in ``.seg.nrrd`` (any letter case)."""
    return Path(path).name.lower().endswith(SLICER_SUFFIX)


def open_label_file(
    path: Path, *, max_voxels: int = _MAX_VOXELS, raw: bytes | None = None
) -> Callable[[], Volume]:
    """Check the header of an integer label map (NIfTI with nibabel, NRRD/MetaImage with
    SimpleITK) now; the returned function reads its voxels."""
    path = Path(path)
    if is_itk_file(path):
        return open_itk(path, "mask", max_voxels, labels=True)
    if is_nifti_file(path):
        img = open_nifti(path, "mask", max_voxels, raw=raw)
        return lambda: read_nifti(img, path, "mask", labels=True, raw=raw)
    if not path.exists():
        raise InputError(
            f"mask file {path} does not exist or is not a file; fix the path in the manifest"
        )
    raise InputError(
        f"mask file {path} is not NIfTI, NRRD or MetaImage by its name (expected one of "
        f"{', '.join(MASK_SUFFIXES)}); convert it to one of those"
    )


def read_label_file(path: Path, *, max_voxels: int = _MAX_VOXELS) -> Volume:
    """Read an integer label map from NIfTI (nibabel) or NRRD/MetaImage (SimpleITK)."""
    return open_label_file(path, max_voxels=max_voxels)()


def read_label_regions(
    path: Path, label_map: LabelMap, *, max_voxels: int = _MAX_VOXELS
) -> LabelRegions:
    """A label-map file (NIfTI, NRRD, MetaImage) with the names of its values."""
    volume = read_label_file(path, max_voxels=max_voxels)
    return LabelRegions(
        labels=volume.data, label_map=label_map, affine=volume.affine, path=volume.path
    )


def read_mask_folder(
    folder: Path,
    names: Sequence[str] | None = None,
    *,
    max_voxels: int = _MAX_VOXELS,
    affine_tolerance_mm: float = _TOLERANCE_MM,
) -> NamedMasks:
    """One binary mask per file, named by the file (``spleen.nrrd`` -> ``spleen``).

    Files that are not masks by their name (a README, the ``.raw`` data of a
    ``.mhd``) are ignored; regions come in file-name order. With ``names``
    only the files of those regions are read (a name without a file is left
    for :meth:`NamedMasks.select` to report). Every header is checked before
    any voxel is read. Every file must be binary (0 and one other value) and
    on the first file's grid (every corner voxel centre within
    ``affine_tolerance_mm``), stored in any axis order or direction.
    """
    return open_mask_folder(
        folder, names, max_voxels=max_voxels, affine_tolerance_mm=affine_tolerance_mm
    )()


def open_mask_folder(
    folder: Path,
    names: Sequence[str] | None = None,
    *,
    max_voxels: int = _MAX_VOXELS,
    affine_tolerance_mm: float = _TOLERANCE_MM,
) -> Callable[[], NamedMasks]:
    """List a mask folder and check the headers of its files now; the returned function
    reads their voxels (see :func:`read_mask_folder`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(
            f"mask folder {folder} does not exist or is not a folder; fix the path in the manifest"
        )
    files: dict[str, Path] = {}
    others: list[str] = []
    for entry in sorted(folder.iterdir()):
        name = region_name(entry) if entry.is_file() and not entry.name.startswith(".") else None
        if name is None:
            others.append(entry.name)
            continue
        if name in files:
            raise InputError(
                f"mask folder {folder} has two files for region {name!r}: {files[name].name} "
                f"and {entry.name}; keep one of them"
            )
        if name == BACKGROUND:
            raise InputError(
                f"mask file {entry} is named {BACKGROUND!r}, which is reserved for the voxels "
                "in no region; rename the file, or leave it out of the folder"
            )
        files[name] = entry
    if not files:
        found = ", ".join(others[:10])
        if len(others) > 10:
            found += f", ... ({len(others)} in all)"
        raise InputError(
            f"mask folder {folder} holds no mask files (names ending in "
            f"{', '.join(MASK_SUFFIXES)}); found: {found or 'nothing'}; put one binary mask "
            "file per structure there, named after the structure"
        )
    chosen = {n: f for n, f in files.items() if names is None or n in names} or files
    readers = [open_label_file(path, max_voxels=max_voxels) for path in chosen.values()]
    paths = list(chosen.values())

    def read() -> NamedMasks:
        first = readers[0]()
        masks = [_binary(first.data, paths[0])]
        for path, read_file in zip(paths[1:], readers[1:], strict=True):
            volume = read_file()
            masks.append(_binary(_on_first_grid(first, volume, affine_tolerance_mm), path))
        return NamedMasks(
            names=tuple(chosen),
            masks=tuple(masks),
            sources=tuple(f"file {path.name}" for path in paths),
            affine=first.affine,
            path=folder,
            description="mask folder",
            present=tuple(files) if len(chosen) < len(files) else (),
        )

    return read


def _binary(data: np.ndarray, path: Path) -> np.ndarray:
    """``data != 0``, after checking that the non-zero voxels all hold one value."""
    inside = data != 0
    values = data[inside]
    if values.size and not np.all(values == values[0]):
        other = values[values != values[0]][0]
        raise InputError(
            f"mask file {path} is not binary: it holds the values 0, {values[0]} and {other} "
            f"(values present: {present_values(data)}); a mask folder needs one binary file per "
            "structure (0 outside, one value inside): split the label map into one file per "
            "structure, or give the label-map file itself as the mask with a `labels` map"
        )
    return inside


def _on_first_grid(first: Volume, other: Volume, tolerance_mm: float) -> np.ndarray:
    """``other``'s voxels stored as ``first``'s are: the same physical grid (every corner
    voxel centre within ``tolerance_mm``), in any axis order or direction; another grid
    is a :class:`GeometryError`."""
    ornt = axis_mapping(other.shape, other.affine, first.shape, first.affine, tolerance_mm)
    if ornt is not None:
        return apply_orientation(other.data, ornt)
    fix = (
        "every mask of a folder must be on one grid: resample them onto the image grid "
        "(nearest neighbour), or export them again from the same segmentation"
    )
    if sorted(other.shape) != sorted(first.shape):
        raise GeometryError(
            f"mask file {other.path} has grid {fmt_shape(other.shape)} but {first.path.name} "
            f"in the same folder has {fmt_shape(first.shape)}; {fix}"
        )
    if other.shape == first.shape:
        far = f"up to {corner_distance(first.shape, first.affine, other.affine):.6g} mm"
    else:
        far = "more than the tolerance in every axis order"
    raise GeometryError(
        f"mask file {other.path} lies on another grid than {first.path.name} in the same "
        f"folder: its corner voxels are {far} from the first file's (tolerance "
        f"{tolerance_mm:g} mm): {fmt_affine(other.affine)} vs {fmt_affine(first.affine)}; {fix}"
    )


def read_slicer_segmentation(
    path: Path, names: Sequence[str] | None = None, *, max_voxels: int = _MAX_VOXELS
) -> NamedMasks:
    """Read a 3D Slicer ``.seg.nrrd`` to one mask per segment, named as in Slicer.

    With ``names`` only the masks of those segments are made.

    The data are 3D (one layer) or 4D with the layers first (``kinds: list
    domain domain domain``). Segment N is ``layer == SegmentN_LabelValue`` on
    layer ``SegmentN_Layer``. Files written before Slicer 4.11 have neither
    key: one layer per segment, value 1, which is what is assumed when both
    are absent. The affine places the grid as stored (Slicer may crop it to
    the segments' extent); putting it on the image grid is the check stage's
    business.
    """
    return open_slicer_segmentation(path, names, max_voxels=max_voxels)()


def open_slicer_segmentation(
    path: Path, names: Sequence[str] | None = None, *, max_voxels: int = _MAX_VOXELS
) -> Callable[[], NamedMasks]:
    """Check a ``.seg.nrrd`` header and its segments now; the returned function reads
    the voxels (see :func:`read_slicer_segmentation`)."""
    import SimpleITK as sitk  # noqa: N813 (here: a NIfTI-only run never imports it)

    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"segmentation file {path} does not exist or is not a file; fix the path in the "
            "manifest"
        )
    reader = header_reader(
        path, "NrrdImageIO", f"segmentation file {path} is not a readable NRRD file",
        "save the segmentation again from 3D Slicer (.seg.nrrd)",
    )  # fmt: skip
    size = tuple(int(n) for n in reader.GetSize())
    layers = int(reader.GetNumberOfComponents())
    count = int(np.prod(size))
    if count > max_voxels:
        raise InputError(
            f"segmentation file {path} has {fmt_shape(size)} = {count:,} voxels, more than the "
            f"limit of {max_voxels:,}; crop or downsample it first, or raise the limit with "
            "--max-voxels"
        )
    fields = {key: reader.GetMetaData(key).strip() for key in reader.GetMetaDataKeys()}
    every = _segments(fields, layers, path)
    segments = [seg for seg in every if names is None or seg[0] in names] or every

    def read() -> NamedMasks:
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise InputError(
                f"segmentation file {path}: the header is readable but the voxel data are not "
                f"({itk_error_reason(exc)}); the file is probably truncated or corrupt, save it "
                "again from 3D Slicer"
            ) from None
        volumes = {
            layer: volume_from_sitk(
                sitk.VectorIndexSelectionCast(image, layer) if layers > 1 else image,
                path,
                f"layer {layer} of segmentation {path.name}",
            )
            for layer in sorted({layer for _, layer, _ in segments})
        }
        data = {layer: as_labels(volume.data, path) for layer, volume in volumes.items()}
        return NamedMasks(
            names=tuple(name for name, _, _ in segments),
            masks=tuple(data[layer] == value for _, layer, value in segments),
            sources=tuple(
                f"segment {name!r}, layer {layer}, label value {value}"
                for name, layer, value in segments
            ),
            affine=next(iter(volumes.values())).affine,
            path=path,
            description="3D Slicer segmentation",
            present=tuple(name for name, _, _ in every) if len(segments) < len(every) else (),
        )

    return read


def _segments(fields: dict[str, str], layers: int, path: Path) -> list[tuple[str, int, int]]:
    """(name, layer, label value) of each segment, in segment order, from the header."""
    by_index: dict[int, dict[str, str]] = {}
    for key, text in fields.items():
        match = _SEGMENT_KEY.match(key)
        if match:
            by_index.setdefault(int(match.group(1)), {})[match.group(2)] = text
    if not by_index:
        raise InputError(
            f"segmentation file {path} has no segments in its header (no SegmentN_Name keys); "
            "it is not a 3D Slicer segmentation: give it as a label-map file with a `labels` "
            "map, or save it again from 3D Slicer"
        )
    if sorted(by_index) != list(range(len(by_index))):
        raise InputError(
            f"segmentation file {path} numbers its segments {sorted(by_index)}, expected 0 to "
            f"{len(by_index) - 1}; save it again from 3D Slicer"
        )
    old_style = not any("Layer" in keys or "LabelValue" in keys for keys in by_index.values())
    segments: list[tuple[str, int, int]] = []
    for index in range(len(by_index)):
        keys = by_index[index]
        name = keys.get("Name", "")
        where = f"segmentation file {path}, segment {index}"
        if not name:
            raise InputError(f"{where} has no Segment{index}_Name; name it in 3D Slicer")
        if name == BACKGROUND:
            raise InputError(
                f"{where} is named {BACKGROUND!r}, which is reserved for the voxels in no "
                "region; rename the segment in 3D Slicer"
            )
        if any(name == seen for seen, _, _ in segments):
            raise InputError(
                f"{where}: two segments are named {name!r}; rename one of them in 3D Slicer"
            )
        defaults = {"Layer": str(index), "LabelValue": "1"} if old_style else {}
        numbers: list[int] = []
        for field in ("Layer", "LabelValue"):
            given = keys.get(field, defaults.get(field, ""))
            try:
                numbers.append(int(given))
            except ValueError:
                raise InputError(
                    f"{where} ({name!r}) has Segment{index}_{field} = {given!r}, expected an "
                    "integer; save the segmentation again from 3D Slicer"
                ) from None
        layer, value = numbers
        if not 0 <= layer < layers:
            raise InputError(
                f"{where} ({name!r}) is on layer {layer}, but the file has {layers} layer(s) "
                f"(0 to {layers - 1}); save the segmentation again from 3D Slicer"
            )
        segments.append((name, layer, value))
    return segments


def read_regions(
    path: Path,
    label_map: LabelMap | None = None,
    *,
    max_voxels: int = _MAX_VOXELS,
    affine_tolerance_mm: float = _TOLERANCE_MM,
) -> Regions:
    """Read a mask as a manifest gives it: a folder of masks, a ``.seg.nrrd``, or a
    label-map file (which needs ``label_map``; the other two name their regions)."""
    return open_regions(
        path, label_map, max_voxels=max_voxels, affine_tolerance_mm=affine_tolerance_mm
    )()


def open_regions(
    path: Path,
    label_map: LabelMap | None = None,
    *,
    max_voxels: int = _MAX_VOXELS,
    affine_tolerance_mm: float = _TOLERANCE_MM,
    raw: bytes | None = None,
) -> Callable[[], Regions]:
    """Check a mask's kind and headers now; the returned function reads its voxels.
    ``raw``: the bytes of a NIfTI label-map file, read already.

    A folder of masks and a ``.seg.nrrd`` name their regions, so ``label_map``
    must then hold bare names (only those are read); a label-map file needs
    NAME=VALUE pairs. A map of the wrong kind is an :class:`InputError` that
    says which kind the mask needs.
    """
    path = Path(path)
    by_name = path.is_dir() or is_slicer_segmentation(path)
    if label_map is not None:
        check_label_kind(path, label_map, by_name)
    names = None if label_map is None else [name for name, _ in label_map]
    if path.is_dir():
        return open_mask_folder(
            path, names, max_voxels=max_voxels, affine_tolerance_mm=affine_tolerance_mm
        )
    if is_slicer_segmentation(path):
        return open_slicer_segmentation(path, names, max_voxels=max_voxels)
    if label_map is None:
        raise InputError(
            f"mask file {path} is a label map, and no label map NAME=VALUE,... was given for "
            "it; give one with --labels or the row's `labels` (e.g. tibia=1,femur=2)"
        )
    read = open_label_file(path, max_voxels=max_voxels, raw=raw)

    def regions() -> LabelRegions:
        volume = read()
        return LabelRegions(
            labels=volume.data, label_map=label_map, affine=volume.affine, path=volume.path
        )

    return regions


def check_label_kind(path: Path, label_map: LabelMap, by_name: bool) -> None:
    """Bare names for masks that name their regions, NAME=VALUE for label-map files."""
    given = ",".join(name if value is None else f"{name}={value}" for name, value in label_map)
    bare = ",".join(name for name, _ in label_map)
    if by_name and not names_only(label_map):
        what = "mask folder" if path.is_dir() else "3D Slicer segmentation"
        source = "file names" if path.is_dir() else "segment names"
        raise InputError(
            f"{what} {path} names its regions by its {source}, but the labels {given!r} are "
            f"NAME=VALUE pairs, which name the values of a label-map file; give the region "
            f"names bare in --labels or the row's `labels` (e.g. {bare!r})"
        )
    if not by_name and label_map and names_only(label_map):
        raise InputError(
            f"mask file {path} is a label-map file (one integer per voxel), but the labels "
            f"{given!r} are bare names, which name the files of a mask folder or the segments "
            "of a .seg.nrrd; say which value each region has in --labels or the row's "
            f"`labels` (e.g. {','.join(f'{n}={k}' for k, (n, _) in enumerate(label_map, 1))})"
        )
