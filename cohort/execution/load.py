"""Stage one of the pipeline: fingerprint, load, check and preprocess one subject.

Kept free of torch and of the model, so the Ray tasks that run it start fast
(importing the model stack costs several seconds per worker process); the
least input size of each hooked layer (:class:`~cohort.inputs.geometry.Reach`)
is worked out on the driver and passed in. The memory a subject needs in its
feature actor is estimated from the model input's shape
(:mod:`cohort.model.memory`, pure arithmetic) and checked against
``--actor-memory`` (in-process: the machine's available memory) once
preprocessing has fixed that shape (after ``--spacing`` and ``--crop-margin``);
a subject that does not fit fails at the ``check`` stage instead of having its
worker killed.

Each input file is read once: its bytes give the content hash (the resume
key), and a NIfTI file is decoded from them (:func:`cohort.inputs.nifti.nifti_from_bytes`).
The task hands over the subject placed on the model's grid, in HU, without the
intensity work, as numpy columns that Ray moves without pickling
(:mod:`cohort.inputs.handover`).
"""

from __future__ import annotations

import errno
import gzip
import json
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cohort.config import LabelMap, RunConfig, parse_label_map
from cohort.errors import CohortError
from cohort.inputs.chain import perturb_pair
from cohort.inputs.chain_config import PerturbationConfig
from cohort.inputs.fingerprint import content_hash, fingerprint, sha256_path, subject_key
from cohort.inputs.geometry import Reach, mask_resampled
from cohort.inputs.handover import empty_columns, hu_of, to_columns
from cohort.inputs.preprocess import Placed
from cohort.inputs.readers import VolumePair
from cohort.inputs.stages import Stages
from cohort.model.memory import Budget, Estimate, check_memory

__all__ = [
    "CACHED",
    "DONE",
    "FAILED",
    "IO_RETRY_DELAY_S",
    "PERTURB",
    "READY",
    "RESAMPLED_NOTE",
    "check_actor_memory",
    "failure_row",
    "is_transient",
    "load_subject",
    "perturbed",
    "read_file",
]

FAILED, READY, CACHED, DONE = "failed", "ready", "cached", "done"
PERTURB = "perturb"  # the stage of an error while perturbing (cohort robustness)
# said in a row's message when the subject's mask was put on the image grid (--mask-resample)
RESAMPLED_NOTE = "(mask resampled onto the image grid by nearest neighbour)"
IO_RETRY_DELAY_S = 0.5  # first backoff of a transient I/O retry; doubles per attempt
# OSErrors that say something about the file, not about the moment: never retried
_PERMANENT_OS_ERRORS = (
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    gzip.BadGzipFile,
)


def failure_row(stage: str, err: BaseException, row: Mapping[str, Any]) -> dict[str, str]:
    """An error row's fields; the message names the subject's files when ``err`` does not."""
    message = str(err) or type(err).__name__
    files = f"image {row['image']}, mask {row['mask']}"
    if stage == "extract" and isinstance(err, CohortError):
        message = f"subject {row['subject_id']} ({files}): {message}"
    elif not isinstance(err, CohortError) and not isinstance(err, FileNotFoundError):
        # an unexpected error: keep where it happened, for the bug report
        where = traceback.extract_tb(err.__traceback__)[-1:] if err.__traceback__ else []
        location = f" at {where[0].filename}:{where[0].lineno}" if where else ""
        message = (
            f"{message} (subject {row['subject_id']}, {files}; unexpected error{location}: "
            "check these files, and report it as a bug if they are fine)"
        )
    return {
        "status": FAILED,
        "stage": stage,
        "error_type": type(err).__name__,
        "message": message,
    }


def is_transient(err: BaseException) -> bool:
    """True for an I/O error that may pass on a retry (EIO, a stale NFS handle, a
    timeout), also when a reader wrapped it; False for missing or corrupt files."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and not isinstance(cause, _PERMANENT_OS_ERRORS):
            return cause.errno != errno.ENOENT
        cause = cause.__cause__ or cause.__context__
    return False


# ------------------------------------------------------------- stage: loading


def read_file(path: Path) -> bytes:
    """A subject's file, read once: its bytes are hashed (the resume key), then decoded."""
    return Path(path).read_bytes()


def _content(path: Path, contents: dict[Path, bytes]) -> str:
    """sha256 of a file, or of every file in a folder (a DICOM series, a mask folder); a
    file's bytes are kept in ``contents``, so that reading it needs no second read."""
    if path.is_dir():
        return sha256_path(path)
    contents[path] = raw = read_file(path)
    return content_hash(path, raw)  # = sha256_path(path)


def load_subject(
    row: dict[str, Any],
    cfg: RunConfig,
    identity: str,
    finished: frozenset[str],
    reach: Reach | None = None,
    device: str | None = None,
    budget: Budget | None = None,
) -> dict[str, Any]:
    """Ray Data map function: fingerprint, load, check and preprocess one subject.

    ``row`` holds ``subject_id``, ``image``, ``mask`` (file or folder paths),
    ``labels`` (the subject's label map or region names, as text) and
    optionally ``series_uid``. ``reach`` is what the hooked layers need of the
    model input (checked at the check stage and after cropping); ``device``
    (``cpu`` or ``cuda``) is where the run's feature actors hold the network, as
    the driver decided it for the actor pool (for the memory check; left out:
    ``--device``, and the CPU for ``auto``); ``budget`` is what the subject may need
    (left out: a feature actor's, from ``--actor-memory``; an in-process run gives
    the machine's, :mod:`cohort.execution.machine`). Transient
    I/O errors while reading are retried ``cfg.execution.max_retries`` times
    with a doubling backoff; any other failure becomes an error row. A
    subject whose mask was resampled onto the image grid says so in its
    ``message`` (:data:`RESAMPLED_NOTE`), also when it fails later.
    """
    out = {**row, "key": "", "status": READY, "stage": "", "error_type": "", "message": ""}
    out.update(empty_columns())
    spec = str(row.get("perturbation") or "")  # cohort robustness: which perturbation, if any
    out["perturbation"] = spec
    perturbing = False
    stages = Stages((), cfg.preprocess, reach)  # the labels once parsed
    series_uid = str(row.get("series_uid") or "") or None
    resampled = False
    try:
        image, mask = Path(row["image"]), Path(row["mask"])
        for path, role in ((image, "image"), (mask, "mask")):
            if not path.exists():
                raise FileNotFoundError(
                    f"{role} {path} of subject {row['subject_id']} does not exist; "
                    "fix the path in the manifest (relative paths start at its folder)"
                )
        stages.labels = parse_label_map(row["labels"])
        attempts = cfg.execution.max_retries + 1
        for attempt in range(attempts):
            try:
                contents: dict[Path, bytes] = {}
                parts = [_content(image, contents), _content(mask, contents), row["labels"]]
                parts += [identity] + ([f"series_uid={series_uid}"] if series_uid else [])
                print_ = fingerprint(parts + ([f"perturbation={spec}"] if spec else []))
                out["key"] = subject_key(row["subject_id"], print_)
                if out["key"] in finished:
                    out["status"] = CACHED
                    return out
                pair = stages.loaded(image, mask, series_uid, contents)
                del contents  # the voxels are decoded; the file bytes are not needed
                break
            except Exception as err:
                if attempt + 1 == attempts or not is_transient(err):
                    if attempt:
                        err.add_note(f"(after {attempt + 1} attempts)")
                    raise
                time.sleep(IO_RETRY_DELAY_S * 2**attempt)
        resampled = mask_resampled(pair, cfg.preprocess)
        checked = stages.check(pair)
        del pair
        if spec:  # after the check (grids, regions present), before placing
            perturbing = True
            checked, out["perturbation"] = perturbed(checked, stages.labels, spec, row)
            perturbing = False
        placed = stages.place(checked, cfg.regions.background)
        del checked  # what is not placed (e.g. the voxels a crop leaves out)
        stages.stage = "check"  # memory: a check of the model input, whose size is now final
        where = device or ("cpu" if cfg.execution.device == "auto" else cfg.execution.device)
        columns = to_columns(placed)
        check_actor_memory(placed, cfg, reach, image, where, budget, hu_of(columns).itemsize)
        out["message"] = RESAMPLED_NOTE if resampled else ""
        out.update(columns)
    except Exception as err:
        out.update(failure_row(PERTURB if perturbing else stages.stage, err, row))
        if getattr(err, "__notes__", None):
            out["message"] = f"{out['message']} {' '.join(err.__notes__)}"
        if resampled:
            out["message"] = f"{out['message']} {RESAMPLED_NOTE}"
    return out


def perturbed(
    pair: VolumePair, labels: LabelMap, spec: str, row: Mapping[str, Any]
) -> tuple[VolumePair, str]:
    """``cohort robustness``: the checked pair under the perturbation ``spec`` names
    (:mod:`cohort.inputs.chain`), and the parameters it applied as JSON."""
    cfg, index = PerturbationConfig.from_spec(spec)
    subject_id = str(row.get("subject", row["subject_id"]))
    pair, applied = perturb_pair(pair, labels, cfg, subject_id, index)
    return pair, json.dumps(applied, sort_keys=True)


# ------------------------------------------------------------- the actor's memory


def check_actor_memory(
    placed: Placed,
    cfg: RunConfig,
    reach: Reach | None,
    image: Path | str,
    device: str,
    budget: Budget | None = None,
    hu_bytes: int = 2,
) -> Estimate:
    """The subject's estimated peak in its feature actor, or in this process
    (:func:`cohort.model.memory.check_memory`): a ``GeometryError`` with the
    estimate, the limit and the fixes when it exceeds ``budget`` (default:
    ``--actor-memory`` less the worker process). The
    hooked layers are ``reach``'s module paths (resolved on the driver), else the
    configured ones; ``hu_bytes`` the handed-over HU's bytes per voxel."""
    index = placed.region_index
    d, h, w = placed.shape
    window = None
    if placed.deferred is not None:  # --spacing: the stored window is handed over
        wd, wh, ww = (int(n) for n in placed.hu.shape)
        window = (wd, wh, ww)
    layers = [r.module_path for r in reach.layers] if reach is not None else cfg.model.layers
    return check_memory(
        (d, h, w),
        placed.spacing_mm,
        cfg,
        layers,
        device,
        image,
        planes=int(index.shape[0]) if index.ndim == 4 else 1,
        budget=budget,
        window=window,
        hu_bytes=hu_bytes,
    )
