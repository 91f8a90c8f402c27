"""The perturbation chain of ``cohort robustness``: what is drawn, and applied to a loaded pair.

Perturbation ``k`` (1..K) of a subject is a pure function of the loaded image
and regions, the :class:`PerturbationConfig`, the subject's id and ``k``: every
number is drawn from a generator seeded by (seed, subject id, k, component), so
a rerun, a resumed run and the report all get the same perturbation, and
adding a component to the chain leaves the others' draws as they were.
Perturbation 0 is the subject as it is (no spec).

The components run in this order, whatever the order given:

1. ``rotate`` / ``translate``: one world transform (a rotation by an angle
   drawn uniformly in [-angle, angle] about a uniformly random axis through the
   centroid of the named regions, then a shift drawn uniformly in [-shift,
   shift] voxels along each image axis), applied to the image (trilinear) and
   to every region mask on its own grid (:func:`cohort.inputs.perturb.move_masks`);
2. ``noise``: Gaussian noise whose SD is the image's own noise level
   (:func:`cohort.inputs.perturb.noise_level`, from the unperturbed image) times
   ``noise_scale``;
3. ``volume``: every named region grown or shrunk by one fraction drawn
   uniformly in [volume_low, volume_high], exact in voxels;
4. ``contour``: every named region's boundary redrawn within ``contour_mm``,
   its volume kept exactly.

In a label map the regions stay disjoint (a region never grows into another);
regions of a mask folder or a Slicer segmentation change independently. The
default chain, noise + translation + volume change + contour randomisation,
is the one that identified the fewest falsely robust features against
test-retest CT in Zwanenburg et al. (2019), whose contour randomisation used
supervoxels where this one uses a smoothed random field.

References
----------
Zwanenburg A, Leger S, Agolli L, et al. Assessing robustness of radiomic
features by image perturbation. Scientific Reports 2019; 9: 614.
doi:10.1038/s41598-018-36938-4
"""

from __future__ import annotations

import json
import math
import zlib
from typing import Any, Final

import numpy as np

from cohort.config import LabelMap
from cohort.errors import ConfigError, RegionError
from cohort.inputs.chain_config import COMPONENTS, PerturbationConfig
from cohort.inputs.geometry import select_regions
from cohort.inputs.perturb import (
    add_noise,
    affine_spacing,
    centroid_mm,
    change_volume,
    move_image,
    move_masks,
    noise_level,
    randomise_contour,
    rigid,
    rotation_matrix,
)
from cohort.inputs.readers import VolumePair
from cohort.inputs.segmentation import LabelRegions, NamedMasks, Regions
from cohort.inputs.volume import Volume

__all__ = ["applied_defaults", "perturb_pair"]


def applied_defaults(index: int = 0, chain: str = "") -> dict[str, Any]:
    """The parameter columns of a perturbation that changed nothing (perturbation 0)."""
    return {
        "perturbation": index,
        "chain": chain,
        "noise_level_hu": math.nan,
        "noise_sd_hu": 0.0,
        "shift_x_mm": 0.0,
        "shift_y_mm": 0.0,
        "shift_z_mm": 0.0,
        "rotation_deg": 0.0,
        "rotation_axis": "",
        "volume_change": 0.0,
        "contour_band_mm": 0.0,
        "region_voxels": "{}",
    }


_SHIFT_COLUMNS: Final = ("shift_x_mm", "shift_y_mm", "shift_z_mm")  # RAS+ world axes


def _rng(cfg: PerturbationConfig, subject_id: str, index: int, part: str) -> np.random.Generator:
    words = [cfg.seed, zlib.crc32(subject_id.encode()), index, zlib.crc32(part.encode())]
    return np.random.default_rng(words)


def perturb_pair(
    pair: VolumePair, labels: LabelMap, cfg: PerturbationConfig, subject_id: str, index: int
) -> tuple[VolumePair, dict[str, Any]]:
    """Perturbation ``index`` (>= 1) of ``subject_id``'s checked pair; returns the
    perturbed pair (same grids, same kind of regions) and the parameters applied
    (:func:`applied_defaults`' keys). A region left empty is a :class:`RegionError`
    naming the subject, the region, the perturbation and what it drew."""
    if index < 1:
        raise ConfigError(f"perturbation indices start at 1 (0 is the original), got {index}")
    applied = applied_defaults(index, "+".join(c for c in COMPONENTS if c in cfg.chain))
    selected = select_regions(pair.regions, labels)
    names = [name for name, _ in selected]
    masks = [np.asarray(mask, dtype=bool) for _, mask in selected]
    before = [int(np.count_nonzero(m)) for m in masks]
    disjoint = isinstance(pair.regions, LabelRegions)
    image = np.asarray(pair.image.data, dtype=np.float32)
    affine, mask_affine = pair.image.affine, pair.regions.affine

    if "rotate" in cfg.chain or "translate" in cfg.chain:
        rotation, shift = np.eye(3), np.zeros(3)
        if "rotate" in cfg.chain:
            rng = _rng(cfg, subject_id, index, "rotate")
            axis = rng.standard_normal(3)
            axis /= np.linalg.norm(axis)
            angle = float(rng.uniform(-cfg.angle_deg, cfg.angle_deg))
            rotation = rotation_matrix(axis, angle)
            applied["rotation_deg"] = angle
            applied["rotation_axis"] = ",".join(f"{v:.6f}" for v in axis)
        if "translate" in cfg.chain:
            rng = _rng(cfg, subject_id, index, "translate")
            voxels = rng.uniform(-cfg.shift_voxels, cfg.shift_voxels, 3)
            shift = np.asarray(affine)[:3, :3] @ voxels  # image-grid voxels -> RAS mm
            applied.update(zip(_SHIFT_COLUMNS, (float(v) for v in shift), strict=True))
        transform = rigid(rotation, centroid_mm(masks, mask_affine), shift)
        image = move_image(image, affine, transform)
        masks = move_masks(masks, mask_affine, transform, disjoint)

    if "noise" in cfg.chain:
        level = noise_level(pair.image.data)
        sd = cfg.noise_scale * level
        image = add_noise(image, sd, _rng(cfg, subject_id, index, "noise"))
        applied.update(noise_level_hu=level, noise_sd_hu=sd)

    spacing = affine_spacing(mask_affine)
    for component in ("volume", "contour"):
        if component not in cfg.chain:
            continue
        rng = _rng(cfg, subject_id, index, component)
        fraction = float(rng.uniform(cfg.volume_low, cfg.volume_high))
        for r in range(len(masks)):
            others = _others(masks, r) if disjoint else None
            if component == "volume":
                masks[r] = change_volume(masks[r], spacing, fraction, rng, others)
            else:
                masks[r] = randomise_contour(masks[r], spacing, cfg.contour_mm, rng, others)
        if component == "volume":
            applied["volume_change"] = fraction
        else:
            applied["contour_band_mm"] = cfg.contour_mm

    after = [int(np.count_nonzero(m)) for m in masks]
    applied["region_voxels"] = json.dumps(
        {n: [b, a] for n, b, a in zip(names, before, after, strict=True)}
    )
    for name, count in zip(names, after, strict=True):
        if count == 0:
            raise RegionError(
                f"region {name!r} of subject {subject_id} has no voxels after perturbation "
                f"{index} ({_drawn(applied)}); this perturbation is left out of the ICCs. A "
                "region this small rarely survives: narrow --volume-change, or leave it out"
            )
    volume = Volume(image, affine, pair.image.path, f"{pair.image.description}, perturbed")
    return VolumePair(volume, _regions(pair.regions, labels, names, masks)), applied


def _others(masks: list[np.ndarray], r: int) -> np.ndarray:
    """Every region's voxels but region ``r``'s (what ``r`` may not take in a label map)."""
    rest = [m for q, m in enumerate(masks) if q != r]
    return np.any(np.stack(rest), axis=0) if rest else np.zeros_like(masks[r])


def _drawn(applied: dict[str, Any]) -> str:
    """The non-trivial parameters, for messages."""
    parts = [f"{k} {v:.3g}" for k, v in applied.items() if isinstance(v, float) and v]
    return ", ".join(parts) or "nothing drawn"


def _regions(
    regions: Regions, labels: LabelMap, names: list[str], masks: list[np.ndarray]
) -> Regions:
    """Regions of the same kind as ``regions`` holding ``masks`` (on its grid), a label
    map numbered as ``labels`` says."""
    if isinstance(regions, LabelRegions):
        values = dict(labels)
        data = np.zeros(regions.labels.shape, dtype=regions.labels.dtype)
        for name, mask in zip(names, masks, strict=True):
            data[mask] = values[name]
        label_map = tuple((name, values[name]) for name in names)
        return LabelRegions(data, label_map, regions.affine, regions.path)
    sources = dict(zip(regions.names, regions.sources, strict=True))
    return NamedMasks(
        names=tuple(names),
        masks=tuple(masks),
        sources=tuple(f"{sources[name]}, perturbed" for name in names),
        affine=regions.affine,
        path=regions.path,
        description=regions.description,
        present=regions.present,
    )
