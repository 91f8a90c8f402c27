"""RTSTRUCT masks, written with pydicom from the real ct-dicom-20 series (cropped
in-plane to 64 x 64) and contours traced on a label map: the filling rule
against matplotlib's point-in-polygon test, the voxel sets against the label
map, and each of the README's cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as PolygonPath
from scipy import ndimage

from cohort.errors import GeometryError, InputError, RegionError
from cohort.inputs.contours import fill_even_odd
from cohort.inputs.stages import Stages
from cohort.model.hooks import FeatureExtractor
from tests import dicom_objects as objects
from tests.dicom_fixtures import CFG, NAMES, NEAREST, VALUES, built, datasets, labels, masks_of
from tests.test_input_kinds import assert_same_vectors, extractor, vectors

pytestmark = pytest.mark.timeout(300)

__all__ = ["built", "datasets", "extractor", "labels"]  # shared fixtures, used by name


def reference_fill(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Centres inside an odd number of polygons, by matplotlib's point-in-polygon test."""
    u, v = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    centres = np.column_stack([u.ravel(), v.ravel()]).astype(np.float64)
    inside = np.zeros(centres.shape[0], dtype=bool)
    for polygon in polygons:
        inside ^= PolygonPath(polygon).contains_points(centres)
    return inside.reshape(shape)


def test_even_odd_fill_matches_matplotlib_on_random_polygons() -> None:
    rng = np.random.default_rng(11)
    for _ in range(100):
        polygons = []
        for _ in range(int(rng.integers(1, 4))):  # overlapping star-shaped polygons
            n = int(rng.integers(3, 12))
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radii = rng.uniform(2, 15) * rng.uniform(0.5, 1.0, n)
            centre = rng.uniform(-5, 45, 2)  # some reach beyond the plane
            polygons.append(
                centre + np.column_stack([np.cos(angles), np.sin(angles)]) * radii[:, None]
            )
        np.testing.assert_array_equal(
            fill_even_odd(polygons, (40, 30)), reference_fill(polygons, (40, 30))
        )


def test_boundary_contours_give_the_label_map_voxels_and_vectors(
    built: dict[str, Path], labels: np.ndarray, extractor: FeatureExtractor
) -> None:
    masks = masks_of(built["series"], built["rtstruct"], NAMES)
    np.testing.assert_array_equal(masks["bone"], labels == 1)
    np.testing.assert_array_equal(masks["soft"], labels == 2)
    reference = Stages(VALUES, CFG).prepared(built["series"], built["labels"], True)
    rt = Stages(NAMES, CFG).prepared(built["series"], built["rtstruct"], True)
    assert_same_vectors(vectors(extractor, rt), vectors(extractor, reference))


def distance_to_segments(points: np.ndarray, polygons: list[np.ndarray]) -> np.ndarray:
    """Each point's distance to the nearest edge of ``polygons`` (closed), in the plane."""
    best = np.full(len(points), np.inf)
    for polygon in polygons:
        a, b = polygon, np.roll(polygon, -1, axis=0)
        ab = b - a
        t = np.clip(
            np.einsum("pek,ek->pe", points[:, None, :] - a[None], ab) / np.sum(ab * ab, axis=1),
            0,
            1,
        )
        nearest = a[None] + t[..., None] * ab[None]
        best = np.minimum(best, np.min(np.linalg.norm(points[:, None] - nearest, axis=2), axis=1))
    return best


def test_centre_line_contours_differ_only_within_half_a_voxel_of_a_contour(
    built: dict[str, Path], datasets: list[pydicom.Dataset], labels: np.ndarray, tmp_path: Path
) -> None:
    # regions without one-voxel-thin parts (opened in-plane): a contour through the centres
    # of a one-voxel strip encloses no area and is no boundary of the label map
    regions = {
        name: ndimage.binary_opening(labels == value, np.ones((3, 3, 1), dtype=bool))
        for value, name in enumerate(objects.NAMES, start=1)
    }
    lps = objects.affine_lps(datasets)
    rois = {name: objects.centre_line_contours(mask, lps) for name, mask in regions.items()}
    path = objects.write_rtstruct(datasets, rois, tmp_path / "centre-line.dcm")
    masks = masks_of(built["series"], path, NAMES)
    inverse = np.linalg.inv(lps)
    differing = 0
    for name, expected in regions.items():
        diff = np.argwhere(masks[name] != expected)
        differing += len(diff)
        on_planes = [(inverse[:3, :3] @ c.T).T + inverse[:3, 3] for c in rois[name]]
        for k in np.unique(diff[:, 2]):
            polygons = [c[:, :2] for c in on_planes if round(float(c[0, 2])) == k]
            centres = diff[diff[:, 2] == k][:, :2].astype(np.float64)
            assert np.all(distance_to_segments(centres, polygons) <= 0.5 + 1e-6), (name, k)
        # every differing voxel is on the region's boundary (an in-plane neighbour disagrees)
        padded = np.pad(expected, 1, mode="edge")
        edge = np.zeros_like(expected)
        for axis in (0, 1):
            for shift in (-1, 1):
                edge |= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1] != expected
        assert np.all(edge[tuple(diff.T)])
    assert differing > 0  # contours through centres really are decided by the tie rule


def circle(radius: float, centre: tuple[float, float] = (31.3, 30.6)) -> np.ndarray:
    """48 points on a circle, in (column, row) voxel indices."""
    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    return np.column_stack(
        [centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)]
    )


def on_slice(points: np.ndarray, k: int, lps: np.ndarray) -> np.ndarray:
    """(column, row) indices on slice ``k`` -> LPS mm."""
    index = np.column_stack([points, np.full(len(points), k), np.ones(len(points))])
    return (lps @ index.T).T[:, :3]


def test_a_roi_with_a_hole_is_a_ring(
    built: dict[str, Path], datasets: list[pydicom.Dataset], tmp_path: Path
) -> None:
    lps = objects.affine_lps(datasets)
    outer, inner = circle(14.2), circle(6.7)
    rings = [on_slice(c, k, lps) for k in (8, 9, 10) for c in (outer, inner)]
    path = objects.write_rtstruct(datasets, {"ring": rings}, tmp_path / "ring.dcm")
    ring = masks_of(built["series"], path, (("ring", None),))["ring"]
    plane = reference_fill([outer, inner], (64, 64))
    for k in range(20):
        np.testing.assert_array_equal(ring[:, :, k], plane if k in (8, 9, 10) else False)
    u, v = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    distance = np.hypot(u - 31.3, v - 30.6)
    assert not ring[:, :, 9][distance < 6.0].any()  # the hole
    assert ring[:, :, 9][(distance > 7.5) & (distance < 13.5)].all()  # the ring around it


def test_an_empty_roi_is_an_error_only_when_named(
    built: dict[str, Path], datasets: list[pydicom.Dataset], labels: np.ndarray, tmp_path: Path
) -> None:
    lps = objects.affine_lps(datasets)
    rois = {"bone": objects.boundary_contours(labels == 1, lps), "planned": []}
    path = objects.write_rtstruct(datasets, rois, tmp_path / "empty.dcm")
    bone = masks_of(built["series"], path, (("bone", None),))["bone"]
    np.testing.assert_array_equal(bone, labels == 1)
    with pytest.raises(RegionError, match=r"ROI 2 'planned', no contours\) has no voxels"):
        masks_of(built["series"], path, (("bone", None), ("planned", None)))


def test_contours_between_the_slices_need_nearest_then_take_the_nearest_plane(
    built: dict[str, Path], datasets: list[pydicom.Dataset], labels: np.ndarray, tmp_path: Path
) -> None:
    lps = objects.affine_lps(datasets)
    moved = lps.copy()
    moved[:3, 3] += lps[:3, 2] * 0.3  # every contour 0.6 mm above its slice
    rois = {"bone": objects.boundary_contours(labels == 1, moved)}
    path = objects.write_rtstruct(datasets, rois, tmp_path / "between.dcm")
    with pytest.raises(GeometryError, match=r"between the slices .* 0\.6 mm .*--mask-resample"):
        masks_of(built["series"], path, (("bone", None),))
    pair = Stages((("bone", None),), NEAREST).checked(built["series"], path)
    prepared = Stages((("bone", None),), NEAREST).preprocess(pair, background=False)
    # on the image grid again: each slice takes the plane 0.3 slices above it
    expected = labels == 1
    dhw = np.transpose(expected, (2, 1, 0))[:, ::-1, ::-1]  # (column, row, slice) LPS -> D, H, W
    np.testing.assert_array_equal(prepared.region_index == 0, dhw)


def test_oblique_contours_are_refused(
    built: dict[str, Path], datasets: list[pydicom.Dataset], tmp_path: Path
) -> None:
    lps = objects.affine_lps(datasets)
    corners = np.array([[10, 10, 5, 1], [40, 10, 9, 1], [40, 40, 9, 1], [10, 40, 5, 1.0]])
    path = objects.write_rtstruct(
        datasets, {"tilted": [(lps @ corners.T).T[:, :3]]}, tmp_path / "oblique.dcm"
    )
    with pytest.raises(GeometryError, match=r"not parallel to any family of the image's slice"):
        masks_of(built["series"], path, (("tilted", None),))


def test_a_contour_reaching_outside_the_image_is_an_error(
    built: dict[str, Path], datasets: list[pydicom.Dataset], tmp_path: Path
) -> None:
    lps = objects.affine_lps(datasets)
    square = np.array(
        [[50.3, 10.4, 4, 1], [69.6, 10.4, 4, 1], [69.6, 19.7, 4, 1], [50.3, 19.7, 4, 1]]
    )
    path = objects.write_rtstruct(
        datasets, {"wide": [(lps @ square.T).T[:, :3]]}, tmp_path / "wide.dcm"
    )
    # centres u = 51..69 (strictly inside), v = 11..19: 19 x 9, of which u >= 64: 6 x 9 outside
    with pytest.raises(RegionError, match=r"encloses 54 voxel centres outside the image"):
        masks_of(built["series"], path, (("wide", None),))


def test_labels_must_be_bare_roi_names(built: dict[str, Path]) -> None:
    with pytest.raises(InputError, match=r"RTSTRUCT .* names its regions by ROIName"):
        masks_of(built["series"], built["rtstruct"], VALUES)
    with pytest.raises(RegionError, match=r"no region 'liver'; regions \(ROIName\): 'bone'"):
        masks_of(built["series"], built["rtstruct"], (("liver", None),))
