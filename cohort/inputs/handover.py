"""What a loader hands to a feature actor: HU as integers and the region index, no pickle.

A :class:`~cohort.inputs.preprocess.Placed` subject travels as three columns
of the loader's result row:

- ``hu``: the image in HU on the model's grid, (D, H, W), as int16 whenever
  every value is a whole number in int16's range (every CT stored as integers,
  and float-stored ones holding whole HU): 2 bytes per voxel. With ``--spacing``
  it is the window of the stored image, on the image's own grid, that the model
  grid samples (the actor resamples it on its device: ``meta``'s ``deferred``);
- ``hu_float``: the same as float32 when int16 would change a value (an image
  stored as fractional floats, or perturbed by ``cohort robustness``), 4 bytes
  per voxel; the other of the two is empty. Two
  columns, not one of either type, because Ray Data puts rows of several
  loaders in one Arrow block, whose tensor column has one type;
- ``planes``: the uint8 region index as (P, D, H, W) planes, 1 byte per voxel
  per plane;
- ``meta``: region names, voxel counts, spacing, orientation as a short JSON
  text.

Ray Data keeps numpy arrays in a row as tensor columns of its Arrow blocks, so
they reach the actor without ``pickle``: the actor reads them as read-only
views of the object store (zero copy), and the window and normalisation run
there, in float32 on the network's device (:mod:`cohort.model.intensity`).
A row that carries no subject (cached or failed) has empty arrays.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Final

import numpy as np

from cohort.inputs.preprocess import Deferred, Placed
from cohort.inputs.regions import as_region_index, planes_of

__all__ = [
    "ARRAYS",
    "COLUMNS",
    "compact_hu",
    "empty_columns",
    "from_row",
    "handed_bytes",
    "hu_of",
    "to_columns",
]

COLUMNS: Final = ("hu", "hu_float", "planes", "meta")  # the hand-over's columns of a row
ARRAYS: Final = COLUMNS[:3]  # those that hold arrays
_INT16 = np.iinfo(np.int16)


def compact_hu(hu: np.ndarray) -> np.ndarray:
    """``hu`` as int16 when that holds every value exactly, else as float32.

    Integers in int16's range are cast; other integers and floats are checked
    (whole numbers within the range) and cast when they pass, so the values
    never change, only their type.
    """
    if hu.dtype == np.int16:
        return hu
    if hu.size == 0:
        return hu.astype(np.int16)
    if np.issubdtype(hu.dtype, np.integer):
        if int(hu.min()) >= _INT16.min and int(hu.max()) <= _INT16.max:
            return hu.astype(np.int16)
        return hu.astype(np.float32)
    low, high = float(hu.min()), float(hu.max())
    if np.isfinite(low) and np.isfinite(high) and low >= _INT16.min and high <= _INT16.max:
        whole = hu.astype(np.int16)
        if np.array_equal(whole, hu):
            return whole
    return hu.astype(np.float32, copy=False)


def to_columns(placed: Placed) -> dict[str, Any]:
    """The hand-over columns of a placed subject (arrays shared, not copied, where their
    type is already the one handed over)."""
    meta = {
        "region_names": list(placed.region_names),
        "voxels": [int(n) for n in placed.voxels],
        "spacing_mm": [float(s) for s in placed.spacing_mm],
        "original_orientation": placed.original_orientation,
        "mask_resampled": bool(placed.mask_resampled),
        "deferred": None if placed.deferred is None else asdict(placed.deferred),
    }
    hu = compact_hu(placed.hu)
    whole = hu.dtype == np.int16
    return {
        "hu": hu if whole else np.zeros((0, 0, 0), dtype=np.int16),
        "hu_float": np.zeros((0, 0, 0), dtype=np.float32) if whole else hu,
        "planes": np.ascontiguousarray(planes_of(placed.region_index), dtype=np.uint8),
        "meta": json.dumps(meta),
    }


def empty_columns() -> dict[str, Any]:
    """The hand-over columns of a row without a subject (cached or failed): empty arrays
    of the same number of axes, so that every block has one schema."""
    return {
        "hu": np.zeros((0, 0, 0), dtype=np.int16),
        "hu_float": np.zeros((0, 0, 0), dtype=np.float32),
        "planes": np.zeros((0, 0, 0, 0), dtype=np.uint8),
        "meta": "",
    }


def from_row(row: Mapping[str, Any]) -> Placed:
    """The placed subject of a loader's row (its arrays as they came: views, no copy)."""
    meta = json.loads(str(row["meta"]))
    d, h, w = (float(s) for s in meta["spacing_mm"])
    return Placed(
        hu=hu_of(row),
        region_index=as_region_index(np.asarray(row["planes"])),
        region_names=tuple(meta["region_names"]),
        voxels=tuple(int(n) for n in meta["voxels"]),
        spacing_mm=(d, h, w),
        original_orientation=str(meta["original_orientation"]),
        mask_resampled=bool(meta["mask_resampled"]),
        deferred=_deferred(meta.get("deferred")),
    )


def _deferred(fields: Mapping[str, Any] | None) -> Deferred | None:
    if fields is None:
        return None
    d, h, w = (float(r) for r in fields["ratio"])
    triples = {
        name: tuple(int(n) for n in fields[name]) for name in ("start", "shape", "origin", "extent")
    }
    return Deferred(
        ratio=(d, h, w),
        start=_triple(triples["start"]),
        shape=_triple(triples["shape"]),
        origin=_triple(triples["origin"]),
        extent=_triple(triples["extent"]),
        flips=tuple(int(a) for a in fields["flips"]),
    )


def _triple(values: tuple[int, ...]) -> tuple[int, int, int]:
    a, b, c = values
    return a, b, c


def handed_bytes(columns: Mapping[str, Any]) -> int:
    """Bytes of the hand-over's arrays (what the object store holds per subject, besides
    a few hundred bytes of Arrow framing and the short columns)."""
    return int(hu_of(columns).nbytes + np.asarray(columns["planes"]).nbytes)


def hu_of(row: Mapping[str, Any]) -> np.ndarray:
    """The handed-over HU of a row: ``hu`` (int16), or ``hu_float`` where that holds it."""
    hu = np.asarray(row["hu"])
    if hu.size == 0 and "hu_float" in row and np.asarray(row["hu_float"]).size:
        return np.asarray(row["hu_float"])
    return hu
