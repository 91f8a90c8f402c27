"""--spacing on the actor's device (cohort.model.intensity.resample_hu): the window the
loader hands over, resampled there, equals scipy.ndimage's resampling of the whole
image cropped afterwards (cohort.inputs.preprocess.resample_image, the reference),
bit for bit in float32; and a hand-computed case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cohort.inputs.preprocess import (
    Deferred,
    resample_image,
    resampled_shape,
    sample_points,
    sample_window,
)
from cohort.model import preparation
from cohort.model.intensity import resample_hu

pytestmark = pytest.mark.timeout(60)


def test_a_hand_computed_upsampling() -> None:
    """HU 0, 10, 20 at 1 mm resampled to 0.5 mm: voxel i samples (i + 0.5) / 2 - 0.5,
    i.e. -0.25 (the edge: 0), 0.25, 0.75, 1.25, 1.75, 2.25 (the edge: 20)."""
    hu = torch.tensor([0, 10, 20], dtype=torch.int16).reshape(3, 1, 1)
    deferred = Deferred(
        ratio=(0.5, 1.0, 1.0), start=(0, 0, 0), shape=(6, 1, 1), origin=(0, 0, 0), extent=(3, 1, 1)
    )
    got = resample_hu(hu, deferred).reshape(-1).tolist()
    assert got == [0.0, 2.5, 7.5, 12.5, 17.5, 20.0]


def test_the_sample_points_follow_scipy_at_the_edges() -> None:
    first, second, weight = sample_points(0.5, 0, 6, 0, 3)
    assert first.tolist() == [0, 0, 0, 1, 1, 2] and second.tolist() == [1, 1, 1, 2, 2, 2]
    np.testing.assert_array_equal(weight, [0.0, 0.25, 0.75, 0.25, 0.75, 0.0])


@pytest.mark.parametrize("seed", range(12))
def test_a_cropped_flipped_window_equals_ndimage_bit_for_bit(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if seed % 2:  # each pass in pieces of a few output voxels, as a full-size CT's are
        monkeypatch.setattr(preparation, "RESAMPLE_VOXELS", 97)
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(5, 40, 3))
    spacing = tuple(float(s) for s in rng.uniform(0.3, 2.0, 3))
    target = tuple(float(t) for t in rng.uniform(0.3, 2.0, 3))
    image = rng.integers(-1024, 3000, shape).astype(np.int16)
    whole = resample_image(image, spacing, target)  # the reference: scipy.ndimage
    assert whole.shape == resampled_shape(image.shape, spacing, target)
    starts = [int(rng.integers(0, n)) for n in whole.shape]
    stops = [int(rng.integers(a + 1, n + 1)) for a, n in zip(starts, whole.shape, strict=True)]
    box = tuple(slice(a, b) for a, b in zip(starts, stops, strict=True))
    flips = tuple(a for a in range(3) if rng.random() < 0.5)
    ratio = (target[0] / spacing[0], target[1] / spacing[1], target[2] / spacing[2])
    window, deferred = sample_window(image, ratio, box, whole[box].shape, flips)
    assert window.dtype == np.int16 and window.size <= image.size  # the stored integers
    got = resample_hu(torch.from_numpy(np.ascontiguousarray(window)), deferred).numpy()
    expected = np.flip(whole[box], flips) if flips else whole[box]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_the_comparison_can_fail() -> None:
    """Another start of the crop gives other values: the test above would see it."""
    image = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) * 7
    whole = resample_image(image, (1.0, 1.0, 1.0), (0.7, 0.9, 1.3))
    box = (slice(1, 4), slice(0, 3), slice(0, 2))
    _, deferred = sample_window(image, (0.7, 0.9, 1.3), box, whole[box].shape, ())
    moved = Deferred(**{**deferred.__dict__, "start": (0, 0, 0), "origin": (0, 0, 0)})
    got = resample_hu(torch.from_numpy(np.ascontiguousarray(image)), moved).numpy()
    assert got.shape == whole[box].shape and not np.array_equal(got, whole[box])
