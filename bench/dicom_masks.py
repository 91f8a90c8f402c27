"""Read time of the same regions as a NIfTI label map, a DICOM SEG and an RTSTRUCT,
and the voxels an RTSTRUCT's filling differs by (``python -m bench.dicom_masks``).

The objects are made from the real ct-dicom-20 series (``tests/dicom_objects.py``),
at the crop the tests use (64 x 64 x 20) and at the full 512 x 512 x 20: two regions
by thresholds, a SEG (highdicom), an RTSTRUCT of the label map's boundaries
(marching squares at 0.5) and one of contours through the edge voxels' centres.
Each mask is read onto the already-read image, median of 5 reads; the first
highdicom import is timed apart (once per process).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from cohort.config import PreprocessConfig
from cohort.inputs.readers import load_pair, open_dicom_regions
from cohort.inputs.segmentation import open_regions
from cohort.inputs.volume import Volume
from tests import dicom_objects as objects

NAMES = (("bone", None), ("soft", None))
VALUES = (("bone", 1), ("soft", 2))
CFG = PreprocessConfig()


def read_dicom(path: Path, image: Volume) -> object:
    """Header, then the regions on the image's grid: what a subject's load does."""
    read = open_dicom_regions(path, NAMES, CFG)
    assert read is not None
    return read(image)


def median_seconds(read: Callable[[], object], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        read()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(root: Path, crop: tuple[slice, slice]) -> None:
    import nibabel as nib

    datasets = objects.cropped_series(root / "series", rows=crop[0], columns=crop[1])
    labels = objects.label_map_of(datasets)
    opened = {
        name: ndimage.binary_opening(labels == value, np.ones((3, 3, 1), dtype=bool))
        for value, name in enumerate(objects.NAMES, start=1)
    }
    lps = objects.affine_lps(datasets)
    nib.save(nib.Nifti1Image(labels, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps), root / "l.nii.gz")
    masks = {name: labels == value for value, name in enumerate(objects.NAMES, start=1)}
    seg = objects.write_seg(datasets, masks, root / "seg.dcm")
    boundary = {n: objects.boundary_contours(m, lps) for n, m in masks.items()}
    rt = objects.write_rtstruct(datasets, boundary, root / "rt.dcm")
    centre = {n: objects.centre_line_contours(m, lps) for n, m in opened.items()}
    rt_centre = objects.write_rtstruct(datasets, centre, root / "rt-centre.dcm", name="c")
    image = load_pair(root / "series", root / "l.nii.gz", CFG, VALUES).image
    shape = "x".join(str(n) for n in image.shape)
    voxels = {n: int(m.sum()) for n, m in masks.items()}
    contours = sum(len(c) for c in boundary.values())
    sizes = f"NIfTI {(root / 'l.nii.gz').stat().st_size:,} B, SEG {seg.stat().st_size:,} B"
    print(f"\n{shape} voxels, regions {voxels}; files: {sizes}, RTSTRUCT {rt.stat().st_size:,} B")
    print(f"  ({contours} contours)")
    rows = [("NIfTI label map", median_seconds(lambda: open_regions(root / "l.nii.gz", VALUES)()))]
    rows.append(("DICOM SEG", median_seconds(lambda: read_dicom(seg, image))))
    rows.append(("RTSTRUCT (boundaries)", median_seconds(lambda: read_dicom(rt, image))))
    for name, seconds in rows:
        print(f"  {name:24s} {seconds * 1000:8.1f} ms  ({seconds / rows[0][1]:.1f}x NIfTI)")
    for title, path, reference in (
        ("boundaries (between centres)", rt, masks),
        ("centre-line, opened regions", rt_centre, opened),
    ):
        read = open_dicom_regions(path, NAMES, CFG)
        assert read is not None
        got = dict(read(image).select(["bone", "soft"]))
        for name in ("bone", "soft"):
            extra = int(np.count_nonzero(got[name] & ~reference[name]))
            missing = int(np.count_nonzero(~got[name] & reference[name]))
            print(f"  RTSTRUCT {title}: {name} {int(reference[name].sum())} voxels in the label "
                  f"map, {extra} extra, {missing} missing")  # fmt: skip


def main() -> None:
    code = "import time; t = time.perf_counter(); import highdicom; print(time.perf_counter() - t)"
    seconds = float(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                   text=True, check=True).stdout)  # fmt: skip
    print(f"highdicom import in a fresh process: {seconds:.2f} s (once per loader process)")
    crops = {"crop": (objects.ROWS, objects.COLUMNS), "full": (slice(None), slice(None))}
    for name in sys.argv[1:] or list(crops):
        with tempfile.TemporaryDirectory() as folder:
            measure(Path(folder), crops[name])


if __name__ == "__main__":
    main()
