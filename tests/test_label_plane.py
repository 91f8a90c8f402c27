"""One uint8 region plane from a label map: each value's voxels take the value's index.

The reference is a per-voxel dictionary lookup in Python on small random maps; the
fast paths (a compare per value for a few values, a table lookup for more) must
agree with it for unsigned and signed maps, values the dtype cannot hold, and
maps thicker than one slab.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cohort.config import PreprocessConfig
from cohort.inputs.regions import NO_REGION, label_plane
from cohort.inputs.stages import prepare
from tests.nifti_helpers import save_nifti
from tests.test_input_kinds import LABELS, anatomy

pytestmark = pytest.mark.timeout(60)


def reference(labels: np.ndarray, values: list[int], rest: int) -> np.ndarray:
    index = {int(v): r for r, v in enumerate(values)}
    flat = [index.get(int(x), rest) for x in labels.ravel()]
    return np.asarray(flat, dtype=np.uint8).reshape(labels.shape)


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "int8"])
@pytest.mark.parametrize("count", [1, 2, 4, 5, 12])
@pytest.mark.parametrize("background", [False, True])
def test_label_plane_equals_a_per_voxel_lookup(dtype: str, count: int, background: bool) -> None:
    """``rest``: NO_REGION, or the background region's index (after the named ones)."""
    rest = count if background else NO_REGION
    rng = np.random.default_rng([count, rest, len(dtype)])
    info = np.iinfo(dtype)
    pool = rng.choice(np.arange(max(info.min, -20), min(info.max, 40)), 16, replace=False)
    labels = rng.choice(pool, size=(6, 9, 11)).astype(dtype)
    values = [int(v) for v in pool[:count]]
    if count > 2:
        values[-1] = int(info.max) + 1000  # a value this dtype cannot hold: no voxel
    made = label_plane(labels, values, rest)
    assert made is not None
    got, counts = made
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, reference(labels, values, rest))
    assert counts == tuple(int(np.count_nonzero(labels == v)) for v in values)


def test_label_plane_over_several_slabs() -> None:
    """A map of more than one slab (4 Mi voxels) in each path."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 6, size=(40, 256, 512), dtype=np.uint8)
    for values in ([1, 2], [1, 2, 3, 4, 5]):
        made = label_plane(labels, values, NO_REGION)
        assert made is not None
        got = made[0]
        expected = np.full(labels.shape, NO_REGION, dtype=np.uint8)
        for r, v in enumerate(values):
            expected[labels == v] = r
        np.testing.assert_array_equal(got, expected)


def test_repeated_values_and_wide_labels_are_left_to_the_stacking() -> None:
    labels = np.zeros((2, 3, 4), dtype=np.uint8)
    assert label_plane(labels, [1, 1], NO_REGION) is None
    assert label_plane(labels.astype(np.int32), [1, 2], NO_REGION) is None


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize(
    "preprocess",
    [{}, {"crop_margin_mm": 2.0}, {"target_spacing": (2.0, 1.0, 1.1)}],
    ids=["as-stored", "cropped", "resampled"],
)
def test_region_voxels_are_the_index_own_counts(
    tmp_path: Path, background: bool, preprocess: dict[str, object]
) -> None:
    """The voxels a subject reports per region are those of its region index; as stored
    (the label plane's own counts, the background's the rest) also the label map's."""
    hu, labels, affine = anatomy()
    image = save_nifti(tmp_path / "ct.nii.gz", hu.astype(np.int16), affine)
    extra = np.zeros_like(labels)
    extra[1:3, 1:3, 1:3] = 7  # a value no region names: background when there is one
    mask = save_nifti(tmp_path / "seg.nii.gz", labels + extra, affine)
    cfg = PreprocessConfig(**preprocess)  # type: ignore[arg-type]
    prepared = prepare(image, mask, LABELS, background, cfg)
    index = prepared.region_index
    names = prepared.region_names
    assert len(prepared.voxels) == len(names) == len(LABELS) + background
    own = tuple(int(np.count_nonzero(index == r)) for r in range(len(names)))
    assert prepared.voxels == own
    if not preprocess:
        stored = [int(np.count_nonzero(labels == value)) for _, value in LABELS]
        rest = [labels.size - sum(stored)] if background else []
        assert prepared.voxels == (*stored, *rest)
