"""Stage two of the pipeline: one model per actor, pooled vectors per subject.

:class:`FeatureActor` is the Ray Data callable class behind ``map_batches``:
it builds the inflated, hooked network once and hands it to :class:`Features`, which
holds it on its device and turns each prepared subject from
:mod:`cohort.execution.load` into pooled vectors (or an error row naming the
subject). An in-process run (:mod:`cohort.execution.inprocess`) uses
:class:`Features` without Ray. The module imports only what an actor needs (torch,
the model, the pooling), not the driver's tables and statistics, so an actor
process starts seconds sooner.

Test hook (for fault-injection tests only): with ``COHORT_FAULT_KILL_SUBJECT``
set to a subject id and ``COHORT_FAULT_MARKER`` to a file path in the driver's
environment, the process that extracts that subject (a feature actor, or the
driver itself in an in-process run) acts on ``COHORT_FAULT_MODE``:

- ``once`` (the default): it creates the marker and kills its own process
  (``os._exit``), once, as long as the marker exists;
- ``always``: it kills its process on every attempt (and writes the marker);
- ``hang:SECONDS``: it writes the marker and sleeps that long, as a hung
  worker does.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cohort.config import RunConfig
from cohort.errors import CohortError
from cohort.execution.ledger import died_message
from cohort.execution.load import DONE, FAILED, READY, failure_row
from cohort.inputs.handover import from_row, hu_of
from cohort.inputs.preprocess import Placed
from cohort.model.hooks import FeatureExtractor, resolve_layers
from cohort.model.intensity import normalise_hu, resample_hu
from cohort.model.network import build_network
from cohort.model.pooling import RegionVector, extract
from cohort.model.transfer import DeviceFeed

__all__ = [
    "FAULT_MARKER_ENV",
    "FAULT_MODE_ENV",
    "FAULT_SUBJECT_ENV",
    "FaultHook",
    "FeatureActor",
    "Features",
    "autocast",
    "pick_device",
]

FAULT_SUBJECT_ENV = "COHORT_FAULT_KILL_SUBJECT"  # test hook, see the module docstring
FAULT_MARKER_ENV = "COHORT_FAULT_MARKER"
FAULT_MODE_ENV = "COHORT_FAULT_MODE"


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise CohortError(
                "--device cuda was asked for but this worker sees no CUDA device; "
                "use --device auto or cpu, or run on GPU workers"
            )
        return torch.device("cuda")
    return torch.device("cpu")


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The network's precision: fp32 as it is, or bf16 autocast on ``device``.

    Pooling accumulates in float64 either way (:mod:`cohort.model.pooling`), so bf16
    changes the feature maps, not the sums over them.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass(frozen=True)
class FaultHook:
    """Test hook: kill (or hang) the actor process on ``subject`` (see the module docstring)."""

    subject: str
    marker: Path
    mode: str = "once"  # "once", "always" or "hang"
    hang_s: float = 0.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FaultHook | None:
        subject, marker = environ.get(FAULT_SUBJECT_ENV), environ.get(FAULT_MARKER_ENV)
        if not subject:
            return None
        if not marker:
            raise CohortError(
                f"{FAULT_SUBJECT_ENV} is set but {FAULT_MARKER_ENV} is not; the fault hook "
                "needs a marker file path so that it fires only once (unset both to run normally)"
            )
        mode, _, seconds = environ.get(FAULT_MODE_ENV, "once").partition(":")
        if mode not in ("once", "always", "hang") or (mode == "hang") != bool(seconds):
            raise CohortError(
                f"{FAULT_MODE_ENV} must be once, always or hang:SECONDS, got "
                f"{environ[FAULT_MODE_ENV]!r}"
            )
        return cls(subject, Path(marker), mode, float(seconds or 0))

    def maybe_fire(self, subject_id: str) -> None:
        if subject_id != self.subject:
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if self.mode == "once":
                return
        else:
            os.write(fd, f"killed pid {os.getpid()} on {subject_id} ({self.mode})\n".encode())
            os.close(fd)
        if self.mode == "hang":
            time.sleep(self.hang_s)
            return
        os._exit(17)  # like a segfault or an OOM kill: no cleanup, no exception


class Features:
    """One network on its device, and what it makes of each prepared subject (no Ray:
    the feature actor below wraps it, and an in-process run calls it directly)."""

    def __init__(
        self,
        network: torch.nn.Module,
        cfg: RunConfig,
        threads: int | None,
        where: str,
        fault: FaultHook | None = None,
    ) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.cfg = cfg
        self.fault = fault  # the test hook, fired before a ready subject's extraction
        self.device = pick_device(cfg.execution.device)
        network = network.to(self.device)
        self.extractor = FeatureExtractor(network, resolve_layers(network, cfg.model.layers))
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.device_name = f"{name} ({where})"
        self.feed = DeviceFeed(self.device)
        # the next subject's copy to the device, started while this one computes (CUDA)
        self._ahead: tuple[str, Future[list[torch.Tensor]]] | None = None

    def prefetch(self, row: Mapping[str, Any]) -> None:
        """Start copying a ready row's arrays to the device (CUDA; elsewhere nothing), so
        that the copy overlaps the subject being computed now."""
        if self.feed.ahead and row["status"] == READY and self._ahead is None:
            arrays = [hu_of(row), np.asarray(row["planes"])]
            self._ahead = (str(row["key"]), self.feed.start(arrays))

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """A loader's row as a result row: a ready subject becomes ``done`` with its
        pickled (vector, region voxels) pairs, or an error row of the extract stage;
        any other row passes through."""
        started = time.perf_counter()
        out: dict[str, Any] = {name: row[name] for name in _PASS}
        out["features"] = b""
        if out["status"] == READY:
            if self.fault is not None:
                self.fault.maybe_fire(str(out["subject_id"]))
            try:
                placed = from_row(row)
                vectors = self._extract(placed, f"image {row['image']}", str(row["key"]))
                out["features"] = pickle.dumps(
                    [(v, int(placed.voxels[placed.region_names.index(v.region)])) for v in vectors],
                    protocol=5,
                )
                out["status"] = DONE
            except Exception as err:
                out.update(failure_row("extract", err, row))
        out["seconds"] = time.perf_counter() - started
        out["device"] = self.device_name
        return out

    def _extract(self, placed: Placed, origin: str, key: str = "") -> list[RegionVector]:
        """The pooled vectors of a placed subject (:meth:`_inputs`, then the network)."""
        image, index, air = self._inputs(placed, origin, key)
        with autocast(self.device, self.cfg.model.precision):
            return extract(self.extractor, image, index, placed.region_names, self.cfg.pooling, air)

    def _inputs(
        self, placed: Placed, origin: str, key: str = ""
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """A placed subject as the network's input on its device: HU and region index
        copied there (prefetched when :meth:`prefetch` started it), then the window and
        normalisation (float32); returns the image, the index and the value of air."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == key:
            hu, planes = self.feed.take(ahead[1])
            index = planes[0] if planes.shape[0] == 1 else planes
        else:
            if ahead is not None:
                self.feed.take(ahead[1])  # another subject's copy: let it finish, drop it
            hu, index = self.feed.now([placed.hu, placed.region_index])
        if placed.deferred is not None:  # --spacing: the resampling is done here
            hu = resample_hu(hu, placed.deferred)
        image, air = normalise_hu(hu, self.cfg.preprocess, origin)
        return image, index, air


class FeatureActor:
    """Ray Data callable class: one model (:class:`Features`), loaded once, on this
    actor's device; the run's ledger bounds how often a subject may kill it."""

    def __init__(
        self,
        cfg: RunConfig,
        threads: int | None,
        fault: FaultHook | None = None,
        ledger: Any = None,  # required; None only to keep the keyword order
    ) -> None:
        import ray

        self.ledger = ledger  # the run's AttemptLedger actor: weights and attempts
        box = ray.get(ledger.weights.remote()) if ledger is not None else []
        state = ray.get(box[0]) if box else None
        if state is None:
            raise CohortError(
                "the feature actor found no weights in the run's ledger (its node was lost "
                "with the driver's?); rerun the same command to continue"
            )
        self.cfg = cfg
        network, _ = build_network(cfg.model.backbone, state, cfg.model.inflation)
        granted = ray.get_runtime_context().get_assigned_resources()
        grants = ", ".join(f"{k}={v:g}" for k, v in sorted(granted.items()))
        self.features = Features(network, cfg, threads, f"Ray resources: {grants}", fault)
        self.node = self.arrive(ledger)

    @staticmethod
    def arrive(ledger: Any) -> str:
        """Tell the run's ledger which node this actor runs on (the driver places the
        loaders beside the actors: :mod:`cohort.execution.placement`); returns the node."""
        import ray

        context = ray.get_runtime_context()
        node = context.get_node_id()
        if ledger is not None:
            ray.get(ledger.arrive.remote(context.get_actor_id(), node))
        return node

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [{name: batch[name][i] for name in batch} for i in range(len(batch["subject_id"]))]
        results = []
        for i, row in enumerate(rows):
            # a subject that killed its worker too often becomes an error row here
            ready = row["status"] == READY and not self._died_too_often(row)
            if ready and i + 1 < len(rows):
                self.features.prefetch(rows[i + 1])  # its copy overlaps this one (CUDA)
            result = self.features(row)  # any row not ready passes through
            # where the subject was prepared and where it was consumed (the placement)
            result.update(loaded_on=row.get("loaded_on", ""), consumed_on=self.node)
            results.append(result)
            if ready:
                self.ledger.end.remote(str(row["key"]))
        return {name: np.asarray([r[name] for r in results], dtype=object) for name in _PLACED}

    def _died_too_often(self, row: dict[str, Any]) -> bool:
        """True (and ``row`` made an error row) when this subject's earlier attempts
        killed their worker ``max_retries`` + 1 times."""
        import ray

        key = str(row["key"])
        try:
            deaths = int(ray.get(self.ledger.begin.remote(key))) - 1
        except ray.exceptions.RayError:  # the ledger's node was lost: go on without counting
            return False
        if deaths <= self.cfg.execution.max_retries:
            return False
        self.ledger.end.remote(key)
        row.update(
            status=FAILED,
            stage="extract",
            error_type="WorkerDied",
            message=died_message(str(row["subject_id"]), deaths),
        )
        return True


_PASS: tuple[str, ...] = ("subject_id", "cohort", "image", "mask", "key", "status", "stage")
_PASS += ("error_type", "message")
_PASS += ("perturbation",)  # cohort robustness: the perturbation's parameters (load.perturbed)
_RESULT = (*_PASS, "features", "seconds", "device")  # the columns of a result row
_PLACED = (*_RESULT, "loaded_on", "consumed_on")  # those of a feature actor's (node ids)
