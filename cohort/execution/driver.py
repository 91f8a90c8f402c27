"""The driver of ``cohort run``: plan, stream, keep every subject's result, reduce.

::

    manifest + weights + layers checked (prepare_run)
        --> the Ray Data graph (:mod:`cohort.execution.graph`), one row per subject,
            or the same stages in this process (:mod:`cohort.execution.inprocess`,
            a small local run: session.pick_executor)
        --> a part file per finished subject, an error row per failed one
        --> the reducer (:mod:`cohort.execution.reduce`): tables, tests, run.json

Stage functions never raise for one subject's bad input: the failure becomes a
row with its stage, error type and message, and the run goes on. The driver
checks at the end that every manifest subject is either in the results or in
the errors.

Faults and interruptions:

* a transient I/O error (an ``OSError`` other than a missing or unreadable
  file) while fingerprinting or reading a subject is retried
  ``ExecutionConfig.max_retries`` times with a short backoff;
* a feature actor whose process dies is restarted by Ray and its task retried,
  both at most ``max_retries`` times; a result delivered twice counts once;
* if the Ray graph itself fails, every subject without a result becomes a
  ``Lost`` error row naming the cause, and finished subjects are still written;
* Ctrl-C (SIGINT) stops the run without publishing anything: finished
  subjects stay in their part files, and rerunning the same command continues.

The fault-injection test hook lives with the actor, in :mod:`cohort.execution.extract`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import sys
import threading
import time
from collections.abc import Generator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cohort.config import BACKGROUND, RunConfig
from cohort.errors import CohortError, ExitCode, RunInterruptedError, StalledError
from cohort.execution.load import DONE, FAILED, RESAMPLED_NOTE
from cohort.execution.progress import Progress, pick_mode
from cohort.execution.session import (
    ActorMemory,
    InProcess,
    Pool,
    RayInstance,
    actor_memory,
    ensure_ray,
    joins_nothing,
    pick_executor,
    plan_pool,
    ray_instance,
    usable_cpus,
)
from cohort.execution.units import Finished, SubjectRun, Work
from cohort.inputs.fingerprint import execution_identity
from cohort.outputs import schemas, store

if TYPE_CHECKING:
    import pandas as pd

    from cohort.execution.adjust import Columns
    from cohort.execution.plan import Plan
    from cohort.inputs.manifest import Subject
    from cohort.model.pooling import RegionVector


__all__ = ["RunResult", "add_lost", "cosine_rows", "run", "vector_rows"]


def vector_rows(
    subject_id: str, cohort: str, vectors: Sequence[tuple[RegionVector, int]]
) -> list[dict[str, Any]]:
    """One subject's pooled vectors as features-table rows (vector, region voxels)."""
    return [
        {
            "subject_id": subject_id,
            "cohort": cohort,
            "region": v.region,
            "layer": v.layer,
            "layer_name": v.layer_name,
            "channels": len(v.vector),
            "voxels": voxels,
            "vector": v.vector,
        }
        for v, voxels in vectors
    ]


def cosine_rows(vectors: Sequence[RegionVector]) -> list[dict[str, Any]]:
    """Cosine similarity (float64) of every region pair at every layer of one subject,
    by the reducer's own :func:`cohort.stats.cosine_table`."""
    import pandas as pd

    from cohort import stats

    frame = pd.DataFrame(vector_rows("", "", [(v, 0) for v in vectors]))
    table = stats.cosine_table(frame)
    return [
        {name: row[name] for name in ("layer", "region_a", "region_b", "cosine")}
        for row in table.to_dict("records")
    ]


@dataclass
class RunResult:
    """What a run did; the CLI turns it into output and an exit status."""

    out_dir: Path
    subjects: int = 0
    done: int = 0
    cached: int = 0
    failed: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    origin: pd.DataFrame | None = None
    weights: str = ""
    seconds: float = 0.0
    resampled: list[str] = field(default_factory=list)  # subjects whose mask was resampled
    phases: dict[str, float] = field(default_factory=dict)  # seconds from the start
    memory: ActorMemory | None = None  # what each feature actor requested of Ray
    ray: RayInstance | None = None  # the Ray the run started or joined ...
    in_process: InProcess | None = None  # ... or this process, when it ran without Ray

    @property
    def executor(self) -> str:
        """``ray`` or ``in-process`` (run.json's ``executor``)."""
        return "ray" if self.in_process is None else "in-process"

    def where(self) -> str:
        """Where the stages ran, in words (the summary line's end)."""
        ran = self.ray or self.in_process
        return "" if ran is None else ran.describe()

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.FAILURES if self.failed else ExitCode.OK


def run(
    manifest: Path,
    out_dir: Path,
    cfg: RunConfig,
    *,
    download: bool = True,
    work: Work | None = None,
) -> RunResult:
    """Run the whole analysis; returns counts. Raises only for unusable invocations.

    ``work`` cuts the manifest into units and reduces them (default
    :class:`~cohort.execution.units.SubjectRun`: a unit per subject, ``cohort run``);
    the counts, the progress and the error rows are per unit.

    A subject whose part file already holds its result (same input contents,
    label map and result-affecting options) is reused, not recomputed. On
    Ctrl-C nothing is published and :class:`RunInterruptedError` says how many
    subjects are kept.
    """
    started = time.perf_counter()
    plan, where = _start(manifest, cfg, download)
    work = SubjectRun() if work is None else work
    units, stream = work.units(plan.subjects, cfg)
    plan = dataclasses.replace(plan, subjects=units)  # the driver counts units
    in_process = isinstance(where, InProcess)
    owned = isinstance(where, RayInstance) and where.private  # this run started its Ray
    phases = {("plan_s" if in_process else "ray_and_plan_s"): time.perf_counter() - started}
    if not in_process:  # the actors build their own: the driver need not hold it
        plan = dataclasses.replace(plan, network=None)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = store.Parts(out_dir)
    parts.clean()
    finished = frozenset(parts.keys())
    result = RunResult(
        out_dir,
        subjects=len(plan.subjects),
        weights=plan.weights.detail,
        phases=phases,
        ray=None if isinstance(where, InProcess) else where,
    )
    progress = Progress(len(plan.subjects), pick_mode(*cfg.execution.progress_flags, sys.stderr))
    keys: dict[str, str] = {}
    devices: set[str] = set()
    extract_seconds: list[float] = []
    seen: set[str] = set()
    broken: BaseException | None = None  # why the Ray graph stopped early, if it did
    stopping: threading.Thread | None = None  # the private Ray stopping (see below)
    try:
        actors = plan_pool(cfg, where)
        layers = [info.module_path for info in plan.layers]
        loaders = 0 if isinstance(where, InProcess) else int(where.cpus / cfg.execution.loader_cpus)
        memory = actor_memory(plan.sizes, cfg, layers, actors.device, actors.actors, loaders)
        if isinstance(where, InProcess):  # what it uses: one model, on a GPU or not
            result.in_process = InProcess(where.cpus, actors.gpus)
        else:  # nothing is requested in-process: the loaders check the machine's memory
            result.memory = memory
        rows = _stream(plan, stream, cfg, finished, actors, memory, in_process)
        with contextlib.closing(rows):
            try:
                for row in rows:
                    sid = str(row["subject_id"])
                    if sid in seen:  # a retried task may deliver twice; the first counts
                        continue
                    phases.setdefault("first_result_s", time.perf_counter() - started)
                    seen.add(sid)
                    work.note(row)
                    status = str(row["status"])
                    if RESAMPLED_NOTE in str(row["message"]):
                        result.resampled.append(sid)
                    if status == FAILED:
                        result.failed += 1
                        result.errors.append(_error_row(row))
                    else:
                        keys[sid] = str(row["key"])
                        if status == DONE:
                            _write_part(parts, row)
                            result.done += 1
                            devices.add(str(row["device"]))
                            extract_seconds.append(float(row["seconds"]))
                        else:
                            result.cached += 1
                    progress.update(sid, status)
            except StalledError as err:  # in-process: keep what finished, name the stall
                broken = err
            except CohortError:
                raise
            except Exception as err:  # the Ray graph failed: keep what finished
                broken = err
                if type(err).__name__ == "ExecutionTimeoutError":  # ray.data.exceptions
                    # a hung run: keep what finished, name the stall for the others
                    broken = StalledError(
                        f"nothing moved for {cfg.execution.stall_timeout_s:g} s "
                        "(--stall-timeout), so the run stopped; a worker hung or the actor "
                        "pool is starved of CPUs (give actors fractional CPUs)"
                    )
        progress.close()
        phases["stream_end_s"] = time.perf_counter() - started
        add_lost(plan.subjects, seen, result, broken)
        result.seconds = time.perf_counter() - started
        provenance = _provenance(cfg, plan, result, devices, extract_seconds)
        ordered = [s for s in plan.subjects if s.subject_id in keys]
        stopping = _stop_ray() if owned else None  # the reducer needs no Ray
        done = Finished(
            out_dir,
            parts,
            [keys[s.subject_id] for s in ordered],
            result.errors,
            cfg,
            provenance,
            [s.cohort for s in ordered],
            _columns(plan, cfg),
        )
        result.origin = work.finish(done)
        phases["published_s"] = time.perf_counter() - started
    except KeyboardInterrupt:
        progress.close()
        _release(owned, stopping)
        kept = len(finished) + result.done
        raise RunInterruptedError(
            f"interrupted after {len(seen)} of {result.subjects} subjects; nothing was "
            f"published to {out_dir}, and {result.done} newly finished subject(s) are kept "
            f"({kept} part(s) in {parts.root}); rerun the same command to continue"
        ) from None
    except BaseException:  # a refusal (plan_pool), a bug: no stray Ray for an in-process caller
        _release(owned, stopping)
        raise
    # after publishing, so that a Ctrl-C while Ray stops cannot say nothing was published
    _release(owned, stopping)
    return result


def _start(manifest: Path, cfg: RunConfig, download: bool) -> tuple[Plan, RayInstance | InProcess]:
    """Decide where the run runs, and check it: the plan, and this process's resources
    or those of the Ray the run started (``private``: the run stops it) or joined.

    The model stack is imported and the run checked in a thread while Ray starts on
    the main thread (Ray's processes must be started by the main thread: they die
    with the thread that started them). Only an ``auto`` run that joins no Ray reads
    the manifest first, to count it (the plan then uses what was read); one that
    turns out to see several CUDA devices once torch is imported goes to Ray after
    all, one actor per GPU.
    """
    connected = "ray" in sys.modules and _ray_connected()
    local = joins_nothing(cfg, os.environ, connected)
    subjects = _read(manifest, cfg) if local else None
    count = None if subjects is None else len(subjects)
    in_process = pick_executor(cfg, count, os.environ, connected) == "in-process"
    with ThreadPoolExecutor(max_workers=1) as pool:
        preparing = pool.submit(_prepare, manifest, cfg, download, subjects)
        owned = False
        try:
            owned = False if in_process else ensure_ray(cfg.execution.address)
        finally:
            try:
                plan = preparing.result()  # raises what preparing raised (before any output)
            except BaseException:
                _release(owned, None)  # nothing ran: stop the Ray this run started
                raise
    if in_process:
        here = _this_process()
        if not local or pick_executor(cfg, count, os.environ, connected, int(here.gpus)) != "ray":
            return plan, here
        owned = ensure_ray(cfg.execution.address)
    return plan, ray_instance(private=owned)  # the cluster's resources, read once


def _release(owned: bool, stopping: threading.Thread | None) -> None:
    """On the way out of a run: wait for its own Ray to stop, or stop it now."""
    if stopping is not None:
        stopping.join()
    elif owned:
        _stop_ray().join()


def _stream(
    plan: Plan,
    rows: list[dict[str, Any]],
    cfg: RunConfig,
    finished: frozenset[str],
    actors: Pool,
    memory: ActorMemory,
    in_process: bool,
) -> Generator[dict[str, Any], None, None]:
    """The result rows of the units' stream ``rows``, from the Ray Data graph or from
    this process. The subjects' keys hold the plan's options with the device and
    the torch threads of the actors (:func:`~cohort.inputs.fingerprint.execution_identity`)."""
    identity = execution_identity(plan.identity, actors.device, actors.threads)
    if in_process:
        from cohort.execution import inprocess
        from cohort.execution.machine import in_process_budget, read_host_memory

        # read now: the network is built and no subject is loaded
        budget = in_process_budget(read_host_memory(), cfg)
        return inprocess.stream(
            rows,
            plan.network,
            cfg,
            identity,
            finished,
            actors,
            reach=plan.reach,
            budget=budget,
        )
    from cohort.execution import graph

    return graph.stream(
        rows,
        plan.weights.state_dict,
        cfg,
        identity,
        finished,
        actors,
        memory,
        reach=plan.reach,
    )


def _read(manifest: Path, cfg: RunConfig) -> tuple[Subject, ...] | None:
    """The manifest's subjects, for the choice of executor (None: the plan reads it
    again and says why it cannot be used). The columns the run names as covariates,
    strata or batch are allowed in it."""
    from cohort.execution.adjust import manifest_extras
    from cohort.inputs.manifest import read_manifest

    try:
        return read_manifest(manifest, manifest_extras(cfg.adjust))
    except Exception:
        return None


def _columns(plan: Plan, cfg: RunConfig) -> Columns | None:
    """The covariates, strata and batch of the manifest's subjects, for the reducer (the
    per-subject values only; None for an unadjusted run)."""
    if not cfg.adjust.active:
        return None
    from cohort.execution.adjust import manifest_columns

    return manifest_columns(plan.subjects, plan.manifest, cfg.adjust)


def _ray_connected() -> bool:
    import ray

    return bool(ray.is_initialized())


def _this_process() -> InProcess:
    import torch

    return InProcess(float(usable_cpus()), float(torch.cuda.device_count()))


def _stop_ray() -> threading.Thread:
    """Stop the run's private Ray instance in a thread, while the reducer works (its
    1.4-1.6 s were otherwise paid after the results, at exit)."""
    import ray

    thread = threading.Thread(target=ray.shutdown, name="cohort-ray-shutdown")
    thread.start()
    return thread


def add_lost(
    subjects: Sequence[Subject],
    seen: set[str],
    result: RunResult,
    broken: BaseException | None,
) -> None:
    """The coverage check before anything is written: an error row in ``result`` for
    every manifest subject not in ``seen`` (the subjects the stream returned), then
    results plus error rows must cover ``subjects`` exactly, each subject once.

    A missing subject is a ``Lost`` row of stage ``pipeline``; its message gives the
    cause when the stream stopped early (``broken``), and a stall (a
    :class:`StalledError`) makes it a ``Stalled`` row instead. Raises
    :class:`CohortError` when the rows repeat a subject or do not cover the manifest
    (a bug, never a subject's input).
    """
    error_type = "Stalled" if isinstance(broken, StalledError) else "Lost"
    if broken is None:
        why = "the pipeline returned no result for this subject"
    elif isinstance(broken, StalledError):
        why = f"{broken}; this subject had not finished"
    else:
        text = str(broken).strip().splitlines()
        why = f"the pipeline stopped before this subject finished ({type(broken).__name__}"
        why += f": {text[0]})" if text else ")"
    for subject in subjects:
        if subject.subject_id not in seen:
            result.failed += 1
            result.errors.append(
                {
                    "subject_id": subject.subject_id,
                    "cohort": subject.cohort,
                    "stage": "pipeline",
                    "error_type": error_type,
                    "message": f"{why}; rerun the same command to retry it (finished "
                    "subjects are reused)",
                    "image": str(subject.image),
                    "mask": str(subject.mask),
                }
            )
    failed = {e["subject_id"] for e in result.errors}
    if len(failed) != len(result.errors) or len(failed) != result.failed:
        raise CohortError(f"internal error: error rows repeat a subject ({sorted(failed)})")
    if failed | seen != {s.subject_id for s in subjects}:
        raise CohortError("internal error: results and errors do not cover the manifest")


def _error_row(row: Mapping[str, Any]) -> dict[str, str]:
    return {
        name: str(row[name])
        for name in ("subject_id", "cohort", "stage", "error_type", "message", "image", "mask")
    }


def _write_part(parts: store.Parts, row: Mapping[str, Any]) -> None:
    features = vector_rows(
        str(row["subject_id"]), str(row["cohort"]), pickle.loads(row["features"])
    )
    parts.write(str(row["key"]), store.table(features, schemas.FEATURES_SCHEMA))


def _prepare(
    manifest: Path, cfg: RunConfig, download: bool, subjects: tuple[Subject, ...] | None
) -> Plan:
    from cohort.execution.plan import prepare_run

    return prepare_run(manifest, cfg, download=download, subjects=subjects)


def _provenance(
    cfg: RunConfig,
    plan: Plan,
    result: RunResult,
    devices: set[str],
    extract_seconds: list[float],
) -> dict[str, Any]:
    from cohort.outputs.provenance import versions

    return {
        "manifest": str(plan.manifest),
        "config": cfg.to_dict(),
        "versions": versions(),  # imported in the function: torch is loaded by now
        "weights": {
            "source": plan.weights.source,
            "detail": plan.weights.detail,
            "sha256": plan.weights.sha256,
            "architecture": plan.architecture,
            "dropped": list(plan.weights.dropped),  # published tensors features do not use
        },
        "layers": [dataclasses.asdict(info) for info in plan.layers],
        "device": sorted(devices),
        "counts": {
            "subjects": result.subjects,
            "done": result.done,
            "cached": result.cached,
            "failed": result.failed,
        },
        # subjects loaded in this run whose mask was put on the image grid (--mask-resample)
        "resampled_masks": {"count": len(result.resampled), "subjects": sorted(result.resampled)},
        "timings": {
            **{name: round(seconds, 3) for name, seconds in result.phases.items()},
            "total_s": round(result.seconds, 3),
            "extract_mean_s": round(sum(extract_seconds) / len(extract_seconds), 4)
            if extract_seconds
            else None,
            "subjects_per_s": round(result.done / result.seconds, 4) if result.seconds else None,
        },
        "background": BACKGROUND if cfg.regions.background else None,
        "resources": _resources(result.memory),
        "executor": result.executor,
        "ray": None if result.ray is None else dataclasses.asdict(result.ray),
        "in_process": None if result.in_process is None else dataclasses.asdict(result.in_process),
        "robust_only": None,  # cohort stats --robust-only names its folder here
    }


def _resources(memory: ActorMemory | None) -> dict[str, Any] | None:
    if memory is None:
        return None
    queue = memory.queue_bytes
    return {
        "actor_memory_gb": round(memory.request_bytes / 2**30, 3),
        "queue_mib": None if queue is None else round(queue / 2**20, 1),
        "basis": memory.basis,
    }
