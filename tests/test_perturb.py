"""Each perturbation of cohort robustness on small synthetic volumes, with exact answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from cohort.errors import ConfigError, RegionError
from cohort.inputs.chain import perturb_pair
from cohort.inputs.chain_config import PerturbationConfig, parse_chain
from cohort.inputs.perturb import (
    add_noise,
    centroid_mm,
    change_volume,
    noise_level,
    randomise_contour,
    signed_distance,
)
from cohort.inputs.readers import VolumePair
from cohort.inputs.segmentation import LabelRegions, NamedMasks
from cohort.inputs.volume import Volume

pytestmark = pytest.mark.timeout(120)

SPACING = (0.8, 0.9, 1.5)  # mm along the stored axes i, j, k
SHAPE = (40, 36, 24)
LABELS = (("ball", 1), ("box", 2))


def _affine() -> np.ndarray:
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = (-10.0, 5.0, -30.0)
    return affine


def _ball(centre: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    i, j, k = np.indices(SHAPE, dtype=np.float64)
    d = [(g - c) * s for g, c, s in zip((i, j, k), centre, SPACING, strict=True)]
    return (d[0] ** 2 + d[1] ** 2 + d[2] ** 2) <= radius_mm**2


def _pair(noise_sd: float = 0.0, seed: int = 0) -> VolumePair:
    """A bright ball (1000 HU, label 1) and a darker box (200 HU, label 2) in 0 HU."""
    ball = _ball((14.0, 18.0, 12.0), 7.0)
    box = np.zeros(SHAPE, dtype=bool)
    box[28:36, 8:28, 6:18] = True
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[ball], labels[box] = 1, 2
    image = np.where(ball, 1000.0, np.where(box, 200.0, 0.0)).astype(np.float32)
    image += np.random.default_rng(seed).normal(0.0, noise_sd, SHAPE).astype(np.float32)
    path = Path("synthetic.nii.gz")
    return VolumePair(
        Volume(image, _affine(), path, "synthetic image"),
        LabelRegions(labels, LABELS, _affine(), path),
    )


def _masks(pair: VolumePair) -> dict[str, np.ndarray]:
    return dict(pair.regions.select([name for name, _ in LABELS]))


def _only(*chain: str, **settings: float) -> PerturbationConfig:
    return PerturbationConfig(chain=parse_chain(",".join(chain)), **settings)  # type: ignore[arg-type]


def _weighted_centre(image: np.ndarray) -> np.ndarray:
    """The world centroid of the image's HU (trilinear resampling keeps it exactly)."""
    weight = np.asarray(image, dtype=np.float64)
    index = np.array([(np.indices(SHAPE)[a] * weight).sum() / weight.sum() for a in range(3)])
    return _affine()[:3, :3] @ index + _affine()[:3, 3]


def test_translation_moves_each_region_by_the_drawn_mm() -> None:
    pair = _pair()
    before = {n: centroid_mm([m], _affine()) for n, m in _masks(pair).items()}
    cfg = _only("translate", shift_voxels=3.0)
    for index in (1, 2, 3):
        moved, applied = perturb_pair(pair, LABELS, cfg, "s1", index)
        shift = np.array([applied["shift_x_mm"], applied["shift_y_mm"], applied["shift_z_mm"]])
        assert np.abs(shift).max() > 0.5  # something was drawn
        # the image's content moves by the drawn mm (trilinear: to rounding)
        moved_by = _weighted_centre(moved.image.data) - _weighted_centre(pair.image.data)
        assert moved_by == pytest.approx(shift, abs=0.02)
        # each mask follows it; a mask is voxels, so within half a voxel along each axis
        for name, mask in _masks(moved).items():
            error = np.abs(centroid_mm([mask], _affine()) - before[name] - shift)
            assert (error <= 0.5 * np.array(SPACING)).all(), (name, error)


def test_image_and_masks_stay_aligned_under_every_geometric_perturbation() -> None:
    pair = _pair()
    cfg = _only("translate", "rotate", shift_voxels=2.0, angle_deg=6.0)
    for index in (1, 2, 3, 4):
        moved, applied = perturb_pair(pair, LABELS, cfg, "s1", index)
        assert abs(applied["rotation_deg"]) > 0.3
        masks = _masks(moved)
        ball_mean = float(moved.image.data[masks["ball"]].mean())
        box_mean = float(moved.image.data[masks["box"]].mean())
        still = float(moved.image.data[_masks(pair)["ball"]].mean())
        assert ball_mean > 900.0 and 150.0 < box_mean < 250.0
        # the same moved image under the unmoved mask: the check has power
        assert still < ball_mean - 20.0


def test_volume_change_reaches_its_target_exactly_within_one_voxel_layer() -> None:
    pair = _pair()
    ball = _masks(pair)["ball"]
    count = int(ball.sum())
    one_layer = ndimage.generate_binary_structure(3, 1)
    rng = np.random.default_rng(0)
    for fraction in (-0.2, -0.07, 0.05, 0.2):
        changed = change_volume(ball, SPACING, fraction, rng)
        assert changed.sum() == round(count * (1 + fraction))
        if fraction > 0:
            assert ball[changed].all() or (changed >= ball).all()
            assert (changed <= ndimage.binary_dilation(ball, one_layer)).all()
        else:
            assert (changed <= ball).all()
            assert (ndimage.binary_erosion(ball, one_layer) <= changed).all()
        # a threshold on the signed distance: every voxel taken is at least as near
        distance = signed_distance(ball, SPACING)
        assert distance[changed].max() <= distance[~changed].min() + 1e-9


def test_volume_change_keeps_label_map_regions_disjoint() -> None:
    pair = _pair()
    moved, applied = perturb_pair(pair, LABELS, _only("volume", volume_low=0.2), "s1", 1)
    masks = _masks(moved)
    assert not (masks["ball"] & masks["box"]).any()
    voxels = json.loads(applied["region_voxels"])
    for name, (before, after) in voxels.items():
        assert after == round(before * 1.2) == int(masks[name].sum())


def test_contour_randomisation_keeps_the_volume_and_changes_boundary_voxels_only() -> None:
    ball = _masks(_pair())["ball"]
    band = 1.5
    distance = signed_distance(ball, SPACING)
    for seed in (0, 1, 2):
        redrawn = randomise_contour(ball, SPACING, band, np.random.default_rng(seed))
        assert redrawn.sum() == ball.sum()  # the volume bound: exact
        changed = redrawn != ball
        assert changed.sum() > 10
        assert (np.abs(distance[changed]) <= band).all()
    with pytest.raises(ConfigError, match="contour band"):
        randomise_contour(ball, SPACING, 0.0, np.random.default_rng(0))


def test_noise_has_the_drawn_sd_and_the_estimate_finds_the_image_noise() -> None:
    rng = np.random.default_rng(5)
    clean = _pair().image.data
    noisy = add_noise(clean, 20.0, rng)
    assert float((noisy - clean).std()) == pytest.approx(20.0, rel=0.01)
    # a piecewise-constant image with 12 HU noise: the wavelet estimate ignores the edges
    assert noise_level(_pair(noise_sd=12.0).image.data) == pytest.approx(12.0, rel=0.05)
    padded = np.full(SHAPE, -1024.0, dtype=np.float32)  # constant padding is left out
    padded[:20] = _pair(noise_sd=12.0, seed=3).image.data[:20]
    assert noise_level(padded) == pytest.approx(12.0, rel=0.07)
    # in the chain: the SD drawn is the image's own level, and it is what was added
    pair = _pair(noise_sd=12.0)
    noisier, applied = perturb_pair(pair, LABELS, _only("noise"), "s1", 1)
    assert applied["noise_sd_hu"] == applied["noise_level_hu"] == noise_level(pair.image.data)
    added = noisier.image.data - pair.image.data
    assert float(added.std()) == pytest.approx(applied["noise_sd_hu"], rel=0.01)


def test_a_region_shrunk_to_nothing_is_a_region_error_naming_the_perturbation() -> None:
    pair = _pair()
    labels = pair.regions.labels.copy()
    labels[labels == 1] = 0
    labels[5, 5, 5] = 1  # a one-voxel ball
    tiny = VolumePair(pair.image, LabelRegions(labels, LABELS, _affine(), Path("t.nii.gz")))
    cfg = _only("volume", volume_low=-0.8, volume_high=-0.6)
    with pytest.raises(
        RegionError, match=r"'ball' of subject s1 has no voxels after perturbation 2"
    ):
        perturb_pair(tiny, LABELS, cfg, "s1", 2)


def test_draws_are_seeded_by_subject_index_and_seed_only() -> None:
    pair = _pair(noise_sd=5.0)
    cfg = PerturbationConfig()
    a = perturb_pair(pair, LABELS, cfg, "s1", 1)
    b = perturb_pair(pair, LABELS, cfg, "s1", 1)
    assert a[1] == b[1] and np.array_equal(a[0].image.data, b[0].image.data)
    assert perturb_pair(pair, LABELS, cfg, "s1", 2)[1] != a[1]
    assert perturb_pair(pair, LABELS, cfg, "s2", 1)[1] != a[1]
    other = PerturbationConfig(seed=1)
    assert perturb_pair(pair, LABELS, other, "s1", 1)[1] != a[1]
    # adding a component leaves the others' draws as they were
    more = PerturbationConfig(chain=(*cfg.chain, "rotate"))
    shifted = perturb_pair(pair, LABELS, more, "s1", 1)[1]
    assert shifted["shift_x_mm"] == a[1]["shift_x_mm"]
    assert PerturbationConfig.from_spec(cfg.spec(4)) == (cfg, 4)


def test_mask_folder_regions_stay_named_masks_and_may_overlap() -> None:
    pair = _pair()
    ball = _masks(pair)["ball"]
    wide = ndimage.binary_dilation(ball, iterations=2)
    regions = NamedMasks(
        ("ball", "wide"),
        (ball, wide),
        ("ball.nii.gz", "wide.nii.gz"),
        _affine(),
        Path("m"),
        "mask folder",
    )
    folder = VolumePair(pair.image, regions)
    names = (("ball", None), ("wide", None))
    moved, _ = perturb_pair(folder, names, _only("translate", "volume"), "s1", 1)
    assert isinstance(moved.regions, NamedMasks)
    got = dict(moved.regions.select(["ball", "wide"]))
    assert (got["ball"] & got["wide"]).any()


def test_the_chain_is_validated() -> None:
    with pytest.raises(ConfigError, match="unknown perturbation 'blur'"):
        parse_chain("noise,blur")
    with pytest.raises(ConfigError, match="repeat"):
        PerturbationConfig(chain=("noise", "noise"))
    with pytest.raises(ConfigError, match=">= 2"):
        PerturbationConfig(count=1)
