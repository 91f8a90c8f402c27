"""Synthetic data, generated here from a seed, apart from the code that consumes it.

Two generators:

- phantom knee-CT cohorts (:func:`make_phantom_cohort`): NIfTI images and
  label masks plus a manifest, for the demo, the tests and the benchmarks;
- synthetic result folders (:func:`synthetic_results`): the files a finished
  run writes, with known vectors and no model, for the report, the
  statistics at scale and the benchmarks.

Phantom knees:

Arrays are (D, H, W) like the model input: D runs inferior -> superior,
H posterior -> anterior, W left -> right. A phantom knee has a soft-tissue
cylinder with a fat rim in air, the tibia (label 1) below and the femur
(label 2) above a joint gap, and a patella in front of the femur (bone, but
unlabelled, so it counts as background). Each bone has a cortical shell and a
textured trabecular interior. Cohorts differ by a :class:`CohortEffect`: lower
trabecular density and coarser trabecular texture.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pyarrow as pa
from scipy import ndimage

from cohort import __version__, stats
from cohort.config import BACKGROUND, RunConfig, StatsConfig
from cohort.errors import ConfigError
from cohort.execution.reduce import write_summaries
from cohort.inputs.manifest import Subject, write_manifest
from cohort.outputs import schemas, store

__all__ = [
    "CohortEffect",
    "age_effect",
    "cohort_effect",
    "make_confounded_cohort",
    "make_phantom_cohort",
    "make_phantom_subject",
    "phantom_affine",
    "synthetic_results",
    "write_phantom_nifti",
]

TIBIA, FEMUR = 1, 2  # mask values
DEFAULT_SHAPE = (96, 128, 128)  # (D, H, W)
DEFAULT_SPACING_MM = (1.5, 0.8, 0.8)  # along (D, H, W)
AIR_HU, FAT_HU, SOFT_HU = -1000.0, -90.0, 40.0


@dataclass(frozen=True)
class CohortEffect:
    """The planted group difference: trabecular bone density and texture scale."""

    trabecular_hu: float = 300.0  # mean HU of trabecular bone
    texture_mm: float = 1.0  # spatial scale (Gaussian sigma, mm) of the trabecular pattern

    def __post_init__(self) -> None:
        if self.texture_mm <= 0:
            raise ConfigError(f"texture scale must be > 0 mm, got {self.texture_mm}")


def cohort_effect(index: int) -> CohortEffect:
    """Effect of the ``index``-th cohort: 0 is healthy; each later one has lost 200 HU of
    trabecular density (300 -> 100 HU: marked osteoporotic loss) and has a 2.5 times
    coarser trabecular texture. The step is large enough that the default analysis with
    random weights separates the first two cohorts (the demo's between-cohort tests reach
    q < 0.05 at conv-5); with 80 HU and a doubled texture it did not (q >= 0.85)."""
    if index < 0:
        raise ConfigError(f"cohort index must be >= 0, got {index}")
    return CohortEffect(trabecular_hu=300.0 - 200.0 * index, texture_mm=1.0 * 2.5**index)


def make_phantom_subject(
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM,
    seed: int = 0,
    effect: CohortEffect | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom knee: (HU float32, label uint8), both (D, H, W).

    Anatomy scales with the field of view, so any shape of at least 16 voxels
    per axis works; everything random comes from ``seed``.
    """
    if len(shape) != 3 or min(shape) < 16:
        raise ConfigError(f"phantom shape must be 3 sizes >= 16 (D, H, W), got {shape}")
    if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
        raise ConfigError(f"phantom spacing must be 3 positive mm values, got {spacing_mm}")
    effect = CohortEffect() if effect is None else effect
    rng = np.random.default_rng(seed)
    n_d, n_h, n_w = shape
    s_d, s_h, s_w = spacing_mm
    # centred physical coordinates (mm) as open grids: z superior, y anterior, x right
    z = ((np.arange(n_d) - (n_d - 1) / 2) * s_d).reshape(-1, 1, 1)
    y = ((np.arange(n_h) - (n_h - 1) / 2) * s_h).reshape(1, -1, 1)
    x = ((np.arange(n_w) - (n_w - 1) / 2) * s_w).reshape(1, 1, -1)
    radius = 0.5 * min(n_h * s_h, n_w * s_w)  # in-plane field of view radius
    half_d = 0.5 * n_d * s_d

    # per-subject variation
    size = 1.0 + 0.04 * rng.standard_normal()
    centre_y, centre_x = 0.03 * radius * rng.standard_normal(2)
    joint_z = 0.05 * half_d * rng.standard_normal()
    gap = 0.08 * half_d * (1.0 + 0.1 * rng.standard_normal())
    cortical_hu = 1350.0 + 50.0 * rng.standard_normal()
    trabecular_hu = effect.trabecular_hu + 15.0 * rng.standard_normal()
    soft_hu = SOFT_HU + 5.0 * rng.standard_normal()

    # soft tissue: an elliptic cylinder along D with a fat rim, air outside
    leg = np.hypot((y - centre_y) / (0.85 * radius * size), (x - centre_x) / (0.92 * radius * size))
    hu = np.where(leg < 1.0, np.where(leg > 0.88, FAT_HU, soft_hu), AIR_HU).astype(np.float32)
    hu = np.broadcast_to(hu, shape).copy()

    # bones: elliptic cross-sections (wider left-right), flaring towards the joint
    bone_y, bone_x = y - centre_y, x - centre_x
    rho = np.hypot(bone_y / 0.85, bone_x / 1.1)  # "radius" in mm of the bone cross-section
    decay = 0.45 * half_d
    above = z - joint_z  # mm above the joint plane
    femur_r = radius * size * (0.26 + 0.22 * np.exp(-np.clip(above, 0, None) / decay))
    tibia_r = radius * size * (0.24 + 0.22 * np.exp(-np.clip(-above, 0, None) / decay))
    condyle_rise = 0.10 * radius * (rho / (0.48 * radius)) ** 2  # distal femur curves upward
    femur_floor = gap / 2 + condyle_rise
    femur = (rho < femur_r) & (above > femur_floor)
    tibia = (rho < tibia_r) & (above < -gap / 2)
    shell = 0.04 * radius  # cortical thickness, mm
    femur_inner = (rho < femur_r - shell) & (above > femur_floor + shell)
    tibia_inner = (rho < tibia_r - shell) & (above < -gap / 2 - shell)

    # patella: an ellipsoid in front of the distal femur (bone, unlabelled)
    patella_y = 0.85 * 0.48 * radius * size + 0.2 * radius
    patella = (
        ((above - 0.25 * half_d) / (0.18 * half_d)) ** 2
        + ((bone_y - patella_y) / (0.09 * radius)) ** 2
        + (bone_x / (0.2 * radius)) ** 2
    ) < 1.0

    # trabecular texture: smoothed seeded noise, squashed into strut-like contrast
    sigma = [effect.texture_mm / s for s in spacing_mm]
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    field /= max(float(field.std()), 1e-12)
    texture = trabecular_hu + 150.0 * np.tanh(1.5 * field)

    bone = femur | tibia | patella
    inner = femur_inner | tibia_inner
    hu[bone] = cortical_hu
    hu[inner] = texture[inner]
    hu += rng.normal(0.0, 15.0, size=shape).astype(np.float32)  # scanner noise
    np.clip(hu, -1024.0, 3071.0, out=hu)

    label = np.zeros(shape, dtype=np.uint8)
    label[tibia] = TIBIA
    label[femur] = FEMUR
    return hu, label


def phantom_affine(
    shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]
) -> np.ndarray:
    """RAS affine for a (D, H, W) phantom stored as NIfTI axes (x=W, y=H, z=D)."""
    _, n_h, n_w = shape
    s_d, s_h, s_w = spacing_mm
    affine = np.diag([s_w, s_h, s_d, 1.0])
    affine[:3, 3] = (-(n_w - 1) / 2 * s_w, -(n_h - 1) / 2 * s_h, -600.0)  # a table position
    return affine


def write_phantom_nifti(
    hu: np.ndarray,
    label: np.ndarray,
    spacing_mm: tuple[float, float, float],
    image: Path,
    mask: Path,
) -> None:
    """Save a (D, H, W) phantom as NIfTI (int16 HU with scl_slope 1, uint8 mask), RAS."""
    shape = (int(hu.shape[0]), int(hu.shape[1]), int(hu.shape[2]))
    affine = phantom_affine(shape, spacing_mm)
    for data, path in ((np.round(hu).astype(np.int16), image), (label.astype(np.uint8), mask)):
        img = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm")
        img.header.set_slope_inter(1.0, 0.0)
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, path)


def make_phantom_cohort(
    out_dir: Path,
    n_per_cohort: int = 10,
    cohorts: tuple[str, ...] = ("control", "osteo"),
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    seed: int = 0,
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM,
) -> Path:
    """Write a phantom cohort (images/, masks/, manifest.csv) under ``out_dir``.

    Cohort k gets :func:`cohort_effect` (k); subject ids are ``<cohort>-<NN>``.
    Returns the manifest path.
    """
    if n_per_cohort < 1:
        raise ConfigError(f"subjects per cohort must be >= 1, got {n_per_cohort}")
    if not cohorts or len(set(cohorts)) != len(cohorts):
        raise ConfigError(f"cohort names must be given and distinct, got {cohorts}")
    out_dir = Path(out_dir)
    subjects: list[Subject] = []
    for k, cohort in enumerate(cohorts):
        for i in range(n_per_cohort):
            subject_seed = int(np.random.SeedSequence([seed, k, i]).generate_state(1)[0])
            hu, label = make_phantom_subject(shape, spacing_mm, subject_seed, cohort_effect(k))
            subject_id = f"{cohort}-{i + 1:02d}"
            image = out_dir / "images" / f"{subject_id}.nii.gz"
            mask = out_dir / "masks" / f"{subject_id}.nii.gz"
            write_phantom_nifti(hu, label, spacing_mm, image, mask)
            subjects.append(Subject(subject_id, image, mask, cohort, None, len(subjects) + 1))
    return write_manifest(subjects, out_dir / "manifest.csv")


AGE_RANGES: dict[str, tuple[float, float]] = {"control": (30.0, 55.0), "osteo": (50.0, 75.0)}


def age_effect(age: float) -> CohortEffect:
    """What age does to a phantom knee in the confounded cohort: trabecular density falls
    from 300 HU at 30 years to 100 HU at 75 and the texture coarsens 2.5 times over the
    same span (the demo's cohort difference, spread over age)."""
    span = (age - 30.0) / 45.0
    return CohortEffect(trabecular_hu=300.0 - 200.0 * span, texture_mm=2.5**span)


def make_confounded_cohort(
    out_dir: Path,
    n_per_cohort: int = 10,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    seed: int = 0,
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM,
) -> Path:
    """A phantom cohort where age drives both cohort membership and the bones.

    ``control`` subjects are 30-55 years old and ``osteo`` subjects 50-75 (ages evenly
    spread, overlapping in 50-55); every knee is made by :func:`age_effect` of its age,
    and the cohort itself changes nothing. The manifest has an ``age`` column (run
    with ``--covariates age``). Returns the manifest path.
    """
    if n_per_cohort < 2:
        raise ConfigError(f"subjects per cohort must be >= 2, got {n_per_cohort}")
    out_dir = Path(out_dir)
    subjects: list[Subject] = []
    for k, (cohort, (low, high)) in enumerate(AGE_RANGES.items()):
        for i, age in enumerate(np.linspace(low, high, n_per_cohort)):
            subject_seed = int(np.random.SeedSequence([seed, k, i, 24]).generate_state(1)[0])
            hu, label = make_phantom_subject(shape, spacing_mm, subject_seed, age_effect(age))
            subject_id = f"{cohort}-{i + 1:02d}"
            image = out_dir / "images" / f"{subject_id}.nii.gz"
            mask = out_dir / "masks" / f"{subject_id}.nii.gz"
            write_phantom_nifti(hu, label, spacing_mm, image, mask)
            subjects.append(
                Subject(subject_id, image, mask, cohort, None, len(subjects) + 1,
                        covariates=(("age", f"{age:.1f}"),))
            )  # fmt: skip
    return write_manifest(subjects, out_dir / "manifest.csv")


# ------------------------------------------------------ synthetic result folders


def _subjects_table(
    path: Path, subjects: Sequence[Subject], cohorts: Sequence[str], seed: int
) -> None:
    rng = np.random.default_rng([seed, 24])
    n = len(subjects)
    shift = np.array([5.0 * list(cohorts).index(s.cohort) for s in subjects])
    pd.DataFrame(
        {
            "subject_id": [s.subject_id for s in subjects],
            "age": np.round(rng.uniform(20.0, 80.0, n) + shift, 1),
            "sex": rng.choice(["F", "M"], n),
            "site": rng.choice(["A", "B", "C"], n),
        }
    ).to_csv(path, index=False)


def synthetic_results(
    folder: Path,
    *,
    n_per_cohort: int = 8,
    cohorts: Sequence[str] = ("control", "osteo"),
    layers: Sequence[str] = ("conv-1", "conv-3", "conv-5"),
    channels: int = 32,
    failed: int = 0,
    identical: int = 0,
    images: bool = True,
    cfg: StatsConfig | None = None,
    seed: int = 0,
    subjects_table: bool = False,
) -> Path:
    """Write a result folder with known content and no model; returns ``folder``.

    With ``subjects_table``, also ``subjects.csv``: every subject's ``age`` (uniform
    20-80 years, 5 years older per later cohort), ``sex`` (F/M) and ``site``
    (A/B/C), for ``cohort stats DIR --subjects-table`` (drawn from their own seed, so
    the vectors are the same either way).

    Regions tibia, femur and background; each cohort's vectors are a shared
    direction per layer and region plus a cohort shift plus noise, made
    non-negative like ReLU outputs, drawn a cohort at a time (vectorised: a
    100,000-subject folder takes seconds; ``images=False`` skips the
    phantoms). Stats come from :func:`cohort.stats.run_tests`
    with ``cfg`` (default: 200 bootstrap resamples, 99 permutations). ``failed``
    extra subjects per cohort fail at ``load`` (their files do not exist).
    The first ``identical`` subjects of the first cohort get a femur vector
    equal to their tibia vector (a ``cosine-one`` sanity flag).
    With ``images``, one small phantom knee per cohort is written and every
    finished subject of that cohort points at it in ``manifest.csv``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = cfg or StatsConfig(bootstrap=200, permutations=99)
    rng = np.random.default_rng(seed)
    regions = ("tibia", "femur", BACKGROUND)
    base = {(layer, r): rng.gamma(2.0, 1.0, channels) for layer in layers for r in regions}
    centres = np.stack(list(base.values())).reshape(len(layers), len(regions), channels)
    blocks: list[dict[str, Any]] = []
    subjects: list[Subject] = []
    error_rows: list[dict[str, str]] = []
    data = folder / "data"
    cells = len(layers) * len(regions)  # rows per subject: layer by layer, region by region
    for k, cohort in enumerate(cohorts):
        image, mask = data / f"{cohort}-image.nii.gz", data / f"{cohort}-mask.nii.gz"
        if images:
            hu, label = make_phantom_subject((32, 48, 48), seed=seed + k, effect=cohort_effect(k))
            write_phantom_nifti(hu, label, (1.5, 0.8, 0.8), image, mask)
        shift = np.stack([rng.normal(0.0, 0.6 * k, channels) for _ in base])
        mean = centres + shift.reshape(centres.shape)
        noise = rng.normal(0.0, 0.5, (n_per_cohort, *centres.shape))
        vectors = np.maximum(mean + noise, 0).astype(np.float32)
        if k == 0 and identical:
            vectors[:identical, :, 1] = vectors[:identical, :, 0]  # femur = tibia
        jitter = rng.integers(-500, 500, (n_per_cohort, len(layers), len(regions)))
        ids = np.array([f"{cohort}-{i + 1:03d}" for i in range(n_per_cohort)], dtype=object)
        first = len(subjects) + 1
        subjects += [
            Subject(str(sid), image, mask, cohort, None, first + i) for i, sid in enumerate(ids)
        ]
        blocks.append(
            {
                "subject_id": np.repeat(ids, cells),
                "cohort": np.full(n_per_cohort * cells, cohort, dtype=object),
                "region": np.tile(np.array(regions, dtype=object), n_per_cohort * len(layers)),
                "layer": np.tile(
                    np.repeat(np.array(layers, dtype=object), len(regions)), n_per_cohort
                ),
                "layer_name": np.tile(
                    np.repeat(
                        np.array([f"features.synthetic.{v}" for v in layers], dtype=object),
                        len(regions),
                    ),
                    n_per_cohort,
                ),
                "voxels": (np.array([9000, 11000, 60000]) + jitter).ravel(),
                "vector": vectors.reshape(-1, channels),
            }
        )
        for j in range(failed):
            sid = f"{cohort}-F{j + 1:02d}"
            missing = data / f"{sid}-missing.nii.gz"
            subjects.append(Subject(sid, missing, missing, cohort, None, len(subjects) + 1))
            error_rows.append(
                {
                    "subject_id": sid,
                    "cohort": cohort,
                    "stage": "load",
                    "error_type": "FileNotFoundError",
                    "message": f"image file {missing} of subject {sid} does not exist; fix the "
                    "path in the manifest (relative paths start at its folder)",
                    "image": str(missing),
                    "mask": str(missing),
                }
            )
    columns = {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0]}
    flat = columns.pop("vector")
    features = pd.DataFrame(
        {
            **{
                name: columns[name]
                for name in ("subject_id", "cohort", "region", "layer", "layer_name")
            },
            "channels": np.full(flat.shape[0], channels, dtype=np.int64),
            "voxels": columns["voxels"].astype(np.int64),
            "vector": pd.arrays.ArrowExtensionArray(
                pa.ListArray.from_arrays(
                    pa.array(np.arange(0, flat.size + 1, channels, dtype=np.int32)),
                    pa.array(flat.ravel()),
                )
            ),
        }
    )
    manifest = write_manifest(subjects, folder / "manifest.csv")
    if subjects_table:
        _subjects_table(folder / "subjects.csv", subjects, cohorts, seed)
    similarity = stats.cosine_table(features)
    config = RunConfig(stats=cfg).to_dict()
    digest = hashlib.sha256(flat.tobytes()).hexdigest()
    done = len(subjects) - len(error_rows)
    provenance: dict[str, Any] = {
        "manifest": str(manifest.resolve()),
        "config": config,
        "versions": {"cohort": __version__, "numpy": np.__version__, "pandas": pd.__version__},
        "weights": {
            "source": "synthetic",
            "detail": "synthetic vectors (no model)",
            "sha256": digest,  # of the vectors, standing in for a weights file's
        },
        "layers": [
            {
                "layer": layer,
                "module_path": f"features.synthetic.{layer}",
                "channels": channels,
                "grid": [2, 2, 2],
                "rank": len(layers) - i,
            }
            for i, layer in enumerate(layers)
        ],
        "device": ["none (synthetic)"],
        "counts": {"subjects": len(subjects), "done": done, "cached": 0, "failed": len(error_rows)},
        "timings": {"total_s": 0.0},
        "background": BACKGROUND,
    }

    store.write_parquet(
        store.stamped(store.table(features, schemas.FEATURES_SCHEMA), provenance),
        folder / "features.parquet",
    )
    store.write_parquet(
        store.stamped(store.table(similarity, schemas.SIMILARITY_SCHEMA), provenance),
        folder / "similarity.parquet",
    )
    write_summaries(features, similarity, folder, cfg, provenance)
    errors = store.table(error_rows, schemas.ERRORS_SCHEMA)
    store.write_parquet(store.stamped(errors, provenance), folder / "errors.parquet")
    store.write_csv(errors.to_pandas(), folder / "errors.csv")
    store.write_json(provenance, folder / "run.json")
    return folder
