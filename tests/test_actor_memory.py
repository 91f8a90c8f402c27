"""Sizing the feature actors from the image headers: the largest model input, its
estimate, the Ray memory request and the loaders' queue in the object store."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest

from cohort.config import ExecutionConfig, PreprocessConfig, RunConfig, format_label_map
from cohort.execution import session
from cohort.execution.load import load_subject
from cohort.execution.session import actor_memory
from cohort.inputs import headers
from cohort.inputs.headers import InputSizes, header_grid, scan_sizes
from cohort.inputs.stages import prepare
from cohort.model.memory import GIB, WORKER_BASE_BYTES, estimate_peak_bytes
from tests.nifti_helpers import save_nifti
from tests.test_formats import write_itk
from tests.test_input_kinds import LABELS, anatomy
from tests.test_inputs import stored_as

pytestmark = pytest.mark.timeout(120)

STORAGES = [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, True))]
SPACINGS = [None, (1.157, 0.7, 0.729), (3.0, 1.0, 1.0)]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
@pytest.mark.parametrize("storage", STORAGES, ids=["ras", "permuted-flipped"])
@pytest.mark.parametrize("spacing", SPACINGS, ids=["kept", "fine", "coarse"])
def test_header_size_is_the_prepared_input_size(
    suffix: str,
    storage: tuple[tuple[int, ...], tuple[bool, ...]],
    spacing: tuple[float, float, float] | None,
    tmp_path: Path,
) -> None:
    """The size from the header alone equals the model input the loaders prepare."""
    hu, labels, affine = anatomy()
    s_hu, s_affine = stored_as(hu, affine, *storage)
    s_labels, _ = stored_as(labels, affine, *storage)
    write = save_nifti if suffix == ".nii.gz" else write_itk
    image = write(tmp_path / f"i{suffix}", s_hu, s_affine)
    mask = write(tmp_path / f"m{suffix}", s_labels, s_affine)
    cfg = PreprocessConfig(target_spacing=spacing)
    prepared = prepare(image, mask, LABELS, True, cfg)
    sizes = scan_sizes([image], cfg)
    assert (sizes.sized, sizes.total) == (1, 1)
    assert sizes.largest == (tuple(int(n) for n in prepared.image.shape),)
    if spacing is None:
        assert sizes.windows == ()
    else:  # the grid the loader hands over for the actor to resample (no crop: all of it)
        row = {"subject_id": "s", "image": str(image), "mask": str(mask)}
        row["labels"] = format_label_map(LABELS)
        loaded = load_subject(row, RunConfig(preprocess=cfg), "id", frozenset())
        assert sizes.windows == (tuple(int(n) for n in loaded["hu"].shape),)


def test_scan_keeps_the_largest_and_counts_what_it_could_not_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shapes = [(10, 12, 14), (30, 20, 10), (8, 8, 8), (30, 20, 10)]
    images = [
        save_nifti(tmp_path / f"{n}.nii.gz", np.zeros(s, np.float32)) for n, s in enumerate(shapes)
    ]
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a NIfTI file")
    folder = tmp_path / "dicom"
    folder.mkdir()  # a DICOM folder: sized by its own load stage, not here
    sizes = scan_sizes([*images, broken, folder], PreprocessConfig())
    # stored (x, y, z) with an identity affine: the model input is (z, y, x)
    assert sizes == InputSizes(4, 6, ((10, 20, 30), (14, 12, 10), (8, 8, 8)))
    assert not sizes.complete
    assert header_grid(folder, 10**9) is None
    # headers slower than the scan's time are left out (a slow share): none sized here
    read = headers._model_input
    monkeypatch.setattr(headers, "_model_input", lambda *a: (time.sleep(0.3), read(*a))[1])
    assert scan_sizes(images, PreprocessConfig(), seconds=0.1) == InputSizes(0, 4, ())


def _cfg(actor_memory_gb: float = 3.0) -> RunConfig:
    return RunConfig(execution=ExecutionConfig(actor_memory_gb=actor_memory_gb))


LAYERS = ["features.denseblock4.denselayer16.conv2"]


def test_request_is_the_largest_estimate_with_its_margin() -> None:
    largest = ((96, 128, 128), (64, 64, 64))
    got = actor_memory(InputSizes(5, 5, largest), _cfg(), LAYERS, "cpu", actors=2)
    big = estimate_peak_bytes(largest[0], "densenet121", LAYERS)
    assert got.request_bytes == math.ceil((big.host + WORKER_BASE_BYTES) * session.MARGIN)
    assert got.request_bytes < 3 * GIB
    assert got.queue_bytes == max(
        session.QUEUE_FLOOR_BYTES, 2 * session.QUEUE_PER_ACTOR * big.inputs
    )
    assert "96x128x128" in got.basis and "all 5 sized" in got.basis


def test_queue_holds_one_input_per_loader_that_can_run() -> None:
    """16 CPUs of loaders at 0.5 CPU each feeding one GPU actor: 32 loaders + 1 actor."""
    full = ((216, 512, 512),)
    got = actor_memory(InputSizes(1, 1, full), _cfg(24.0), LAYERS, "cuda", actors=1, loaders=32)
    inputs = estimate_peak_bytes(full[0], "densenet121", LAYERS, device="cuda").inputs
    assert got.queue_bytes == 33 * inputs
    few = actor_memory(InputSizes(1, 1, full), _cfg(24.0), LAYERS, "cuda", actors=1, loaders=2)
    assert few.queue_bytes == session.QUEUE_PER_ACTOR * inputs  # the per-actor floor


def test_queue_grows_with_large_inputs_and_actors() -> None:
    whole_body = ((1000, 512, 512),)
    got = actor_memory(InputSizes(1, 1, whole_body), _cfg(24.0), LAYERS, "cuda", actors=3)
    inputs = estimate_peak_bytes(whole_body[0], "densenet121", LAYERS, device="cuda").inputs
    assert got.queue_bytes == 3 * session.QUEUE_PER_ACTOR * inputs > session.QUEUE_FLOOR_BYTES


def test_with_spacing_the_largest_stored_grids_are_kept_and_sized_with_their_resampling(
    tmp_path: Path,
) -> None:
    """--spacing: an image with a small model input but a large stored grid (fine
    voxels) is kept beside the largest model inputs, and the request covers its
    resampling in the actor, which here needs more than any forward pass."""
    coarse = [
        save_nifti(tmp_path / f"c{n}.nii.gz", np.zeros((40, 40, 40 + n), np.int16))
        for n in range(9)
    ]
    fine = np.eye(4) * 0.25
    fine[3, 3] = 1.0
    dense = save_nifti(tmp_path / "fine.nii.gz", np.zeros((160, 160, 160), np.int16), fine)
    cfg = PreprocessConfig(target_spacing=(1.0, 1.0, 1.0))
    sizes = scan_sizes([*coarse, dense], cfg)
    # the 8 largest model inputs (41..48 slices), and the largest stored grid with them
    assert len(sizes.largest) == len(sizes.windows) == 9
    assert sizes.windows[sizes.largest.index((40, 40, 40))] == (160, 160, 160)
    got = actor_memory(sizes, RunConfig(preprocess=cfg), LAYERS, "cpu", actors=1)
    resampled = estimate_peak_bytes((40, 40, 40), "densenet121", LAYERS, window=(160, 160, 160))
    assert resampled.phase == "resampling"
    largest = max(estimate_peak_bytes(s, "densenet121", LAYERS).host for s in sizes.largest)
    assert resampled.host > largest
    assert got.request_bytes == math.ceil((resampled.host + WORKER_BASE_BYTES) * session.MARGIN)


def test_request_never_exceeds_actor_memory_and_falls_back_when_unsized() -> None:
    large = InputSizes(2, 2, ((512, 512, 512),))
    capped = actor_memory(large, _cfg(2.0), LAYERS, "cpu", actors=1)
    assert capped.request_bytes == 2 * GIB and "needs more" in capped.basis
    for unsized in (None, InputSizes(0, 4, ()), InputSizes(0, 0, ())):
        got = actor_memory(unsized, _cfg(), LAYERS, "cpu", actors=1)
        assert (got.request_bytes, got.queue_bytes) == (3 * GIB, None)
        assert got.basis.startswith("--actor-memory")
    # some sized (a DICOM folder among files, or more headers than the scan's time):
    # the request stays --actor-memory, the queue follows the largest sized input
    partial = actor_memory(InputSizes(3, 4, ((900, 512, 512),)), _cfg(), LAYERS, "cpu", actors=2)
    inputs = estimate_peak_bytes((900, 512, 512), "densenet121", LAYERS).inputs
    assert (partial.request_bytes, partial.queue_bytes) == (3 * GIB, 2 * 4 * inputs)
    assert "3 of 4 sized" in partial.basis


def test_run_requests_the_sized_memory(small_run: Path) -> None:
    """The actors of a real run were granted the request run.json records (below the
    default --actor-memory of 3 GB for 64^3 inputs)."""
    run = json.loads((small_run / "run.json").read_text())
    resources = run["resources"]
    assert 0.5 < resources["actor_memory_gb"] < 3.0
    assert resources["queue_mib"] == session.QUEUE_FLOOR_BYTES / 2**20
    assert "all 6 sized" in resources["basis"]
    (device,) = run["device"]
    granted = float(re.search(r"memory=([0-9.e+]+)", device).group(1))  # type: ignore[union-attr]
    assert granted == pytest.approx(resources["actor_memory_gb"] * GIB, rel=1e-3)
