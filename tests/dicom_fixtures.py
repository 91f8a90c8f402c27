"""Fixtures shared by the DICOM SEG, RTSTRUCT and Enhanced CT tests (import them by
name): the objects of :func:`tests.dicom_objects.made`, built once per module."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from cohort.config import LabelMap, PreprocessConfig
from cohort.inputs.readers import load_pair
from tests import dicom_objects as objects

NAMES: LabelMap = (("bone", None), ("soft", None))
VALUES: LabelMap = (("bone", 1), ("soft", 2))
CFG = PreprocessConfig()
NEAREST = PreprocessConfig(mask_resample="nearest")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not objects.SERIES.is_dir():
        pytest.skip(f"real data not found at {objects.SERIES}")
    return objects.made(tmp_path_factory.mktemp("dicom"))


@pytest.fixture(scope="module")
def datasets(built: dict[str, Path]) -> list[pydicom.Dataset]:
    found = [pydicom.dcmread(p) for p in built["series"].iterdir()]
    return sorted(found, key=lambda ds: float(ds.ImagePositionPatient[2]))


@pytest.fixture(scope="module")
def labels(built: dict[str, Path]) -> np.ndarray:
    return np.asarray(nib.load(built["labels"]).dataobj)


def masks_of(
    image: Path, mask: Path, names: LabelMap, cfg: PreprocessConfig = CFG
) -> dict[str, np.ndarray]:
    """The named regions of ``mask`` as the load stage puts them (on the image's grid)."""
    regions = load_pair(image, mask, cfg, names).regions
    return dict(regions.select([name for name, _ in names]))
