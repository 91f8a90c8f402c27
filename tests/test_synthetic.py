"""Phantom: deterministic, plausible anatomy, the planted cohort difference, readable files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from cohort.config import PreprocessConfig
from cohort.errors import ConfigError
from cohort.inputs.manifest import read_manifest
from cohort.inputs.stages import prepare
from cohort.synthetic import (
    FEMUR,
    TIBIA,
    CohortEffect,
    cohort_effect,
    make_phantom_cohort,
    make_phantom_subject,
)

SMALL = (32, 48, 48)
SMALL_SPACING = (4.5, 2.4, 2.4)  # the default field of view at a third of the resolution


def mean_index(mask: np.ndarray, axis: int) -> float:
    return float(np.nonzero(mask)[axis].mean())


def interior(label: np.ndarray) -> np.ndarray:
    """Bone voxels at least 3 voxels inside the labelled bone: trabecular, not cortical."""
    bone = (label == TIBIA) | (label == FEMUR)
    return ndimage.binary_erosion(bone, iterations=3)


def neighbour_correlation(hu: np.ndarray, inside: np.ndarray) -> float:
    """Correlation of HU between left-right neighbours that are both inside."""
    pairs = inside[:, :, :-1] & inside[:, :, 1:]
    a, b = hu[:, :, :-1][pairs], hu[:, :, 1:][pairs]
    return float(np.corrcoef(a, b)[0, 1])


def test_same_seed_same_arrays_other_seed_differs() -> None:
    hu1, label1 = make_phantom_subject(seed=5)
    hu2, label2 = make_phantom_subject(seed=5)
    np.testing.assert_array_equal(hu1, hu2)
    np.testing.assert_array_equal(label1, label2)
    hu3, _ = make_phantom_subject(seed=6)
    assert not np.array_equal(hu1, hu3)


def test_default_subject_anatomy_is_plausible() -> None:
    hu, label = make_phantom_subject(seed=1)
    assert hu.shape == label.shape == (96, 128, 128)
    assert hu.dtype == np.float32
    assert label.dtype == np.uint8
    assert set(np.unique(label).tolist()) == {0, TIBIA, FEMUR}
    tibia, femur = label == TIBIA, label == FEMUR
    assert np.count_nonzero(tibia) > 5000
    assert np.count_nonzero(femur) > 5000
    assert mean_index(femur, 0) > mean_index(tibia, 0)  # femur superior (higher D)
    tibia_top = int(np.nonzero(tibia)[0].max())
    femur_bottom = int(np.nonzero(femur)[0].min())
    assert femur_bottom - tibia_top >= 2  # a joint gap: at least one slice without bone label
    assert float(hu[0, 0, 0]) == pytest.approx(-1000.0, abs=80.0)  # air in the corner
    assert abs(float(np.median(hu[(label == 0) & (hu > -300) & (hu < 300)])) - 40.0) < 60.0
    cortical = (tibia | femur) & ~interior(label)
    assert 900.0 < float(np.median(hu[cortical])) < 1600.0
    assert 150.0 < float(np.mean(hu[interior(label)])) < 450.0


def test_planted_difference_lower_density_coarser_texture() -> None:
    control = [make_phantom_subject(seed=s, effect=cohort_effect(0)) for s in (11, 12, 13)]
    osteo = [make_phantom_subject(seed=s, effect=cohort_effect(1)) for s in (21, 22, 23)]
    density_c = [float(hu[interior(lab)].mean()) for hu, lab in control]
    density_o = [float(hu[interior(lab)].mean()) for hu, lab in osteo]
    assert max(density_o) < min(density_c)
    assert np.mean(density_c) - np.mean(density_o) > 40.0
    texture_c = [neighbour_correlation(hu, interior(lab)) for hu, lab in control]
    texture_o = [neighbour_correlation(hu, interior(lab)) for hu, lab in osteo]
    assert min(texture_o) > max(texture_c)  # coarser pattern: neighbours more alike


def test_cohort_effect_steps() -> None:
    assert cohort_effect(0) == CohortEffect()
    first, second = cohort_effect(1), cohort_effect(2)
    assert first.trabecular_hu < CohortEffect().trabecular_hu
    assert first.texture_mm > CohortEffect().texture_mm
    assert second.trabecular_hu < first.trabecular_hu
    with pytest.raises(ConfigError):
        cohort_effect(-1)


def test_too_small_shape_is_refused() -> None:
    with pytest.raises(ConfigError, match="phantom shape"):
        make_phantom_subject(shape=(8, 48, 48))


def test_cohort_files_manifest_and_preprocessing(tmp_path: Path) -> None:
    manifest = make_phantom_cohort(
        tmp_path / "demo", n_per_cohort=2, shape=SMALL, seed=3, spacing_mm=SMALL_SPACING
    )
    subjects = read_manifest(manifest)
    assert [(s.subject_id, s.cohort) for s in subjects] == [
        ("control-01", "control"),
        ("control-02", "control"),
        ("osteo-01", "osteo"),
        ("osteo-02", "osteo"),
    ]
    assert "images/control-01.nii.gz" in manifest.read_text(encoding="utf-8")
    for subject in subjects:
        assert subject.image.is_file()
        assert subject.mask.is_file()
        img = nib.load(subject.image)
        assert img.get_data_dtype() == np.int16
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(
            np.linalg.norm(img.affine[:3, :3], axis=0), SMALL_SPACING[::-1], rtol=1e-6
        )
        prepared = prepare(
            subject.image, subject.mask, (("tibia", 1), ("femur", 2)), True, PreprocessConfig()
        )
        assert prepared.image.shape == SMALL
        assert prepared.spacing_mm == pytest.approx(SMALL_SPACING)
        tibia_d = mean_index(prepared.region_index == 0, 0)
        femur_d = mean_index(prepared.region_index == 1, 0)
        assert femur_d > tibia_d  # femur superior after preprocessing
        assert min(prepared.voxels) > 0


def test_cohort_files_hold_the_subject_arrays(tmp_path: Path) -> None:
    manifest = make_phantom_cohort(
        tmp_path, n_per_cohort=1, cohorts=("a",), shape=SMALL, seed=0, spacing_mm=SMALL_SPACING
    )
    (subject,) = read_manifest(manifest)
    seed = int(np.random.SeedSequence([0, 0, 0]).generate_state(1)[0])
    hu, label = make_phantom_subject(SMALL, SMALL_SPACING, seed, cohort_effect(0))
    stored_hu = nib.load(subject.image).get_fdata().transpose(2, 1, 0)  # (x, y, z) -> (D, H, W)
    stored_label = np.asarray(nib.load(subject.mask).dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(stored_hu, np.round(hu))
    np.testing.assert_array_equal(stored_label, label)


def test_cohort_is_deterministic(tmp_path: Path) -> None:
    first = make_phantom_cohort(tmp_path / "a", n_per_cohort=1, shape=SMALL, seed=9)
    second = make_phantom_cohort(tmp_path / "b", n_per_cohort=1, shape=SMALL, seed=9)
    for s1, s2 in zip(read_manifest(first), read_manifest(second), strict=True):
        np.testing.assert_array_equal(
            np.asarray(nib.load(s1.image).dataobj), np.asarray(nib.load(s2.image).dataobj)
        )
        np.testing.assert_array_equal(
            np.asarray(nib.load(s1.mask).dataobj), np.asarray(nib.load(s2.mask).dataobj)
        )
