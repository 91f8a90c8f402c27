"""Where a run's stages run (Ray, or this process), joining or starting Ray, and sizing
the feature actors.

Light on purpose (no torch, no Ray until asked): the driver decides here and starts
Ray while another thread imports the model and checks the run
(:mod:`cohort.execution.driver`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from cohort.config import IN_PROCESS_MAX_SUBJECTS, RunConfig
from cohort.errors import ConfigError
from cohort.inputs.headers import InputSizes
from cohort.model.memory import GIB, WORKER_BASE_BYTES, estimate_peak_bytes

__all__ = [
    "LOCAL_SYSTEM_CONFIG",
    "ActorMemory",
    "InProcess",
    "Pool",
    "RayInstance",
    "actor_memory",
    "ensure_ray",
    "joins_nothing",
    "pick_executor",
    "plan_pool",
    "ray_instance",
    "usable_cpus",
]

# requested over the estimate (the largest input's, plus the worker process): a feature
# actor's peak unique memory in real runs was 0.73-1.04x it from 64^3 to 192x256x256
# (python -m bench.actor_peak), and Ray Data warns at the end of a run when 1.25x an
# actor's peak is above its request
MARGIN = 1.4
QUEUE_PER_ACTOR = 4  # model inputs Ray Data may hold ahead of each actor ...
QUEUE_FLOOR_BYTES = 128 * 2**20  # ... and at least this much, for small inputs

# The private instance of a local run keeps an idle worker process for a minute. Ray's
# default stops one after 1 s once there are more workers than CPUs: the loaders, which
# wait whenever their queue is full, were stopped and started again all through a run,
# each restart importing Ray Data, pandas and nibabel anew (bench/SCALING.md: 14-15
# worker processes instead of 9 for 22 subjects; 12.1-12.5 s -> 8.3-10.4 s from the
# first result to the last). A minute covers a full queue's wait on small volumes; a
# longer wait (full-size volumes on the CPU) is rare next to its subjects' time, and
# idle loaders do not keep their memory for long on a many-core machine.
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}


def joins_nothing(cfg: RunConfig, environ: Mapping[str, str], connected: bool) -> bool:
    """True for an ``auto`` run with no Ray to join: no ``--address``, no
    ``RAY_ADDRESS``, no Ray already connected in this process (such a run may stay
    in-process, :func:`pick_executor`)."""
    execution = cfg.execution
    joins = execution.address or environ.get("RAY_ADDRESS") or connected
    return execution.executor == "auto" and not joins


def pick_executor(
    cfg: RunConfig,
    subjects: int | None,
    environ: Mapping[str, str],
    connected: bool,
    gpus: int | None = None,
) -> Literal["ray", "in-process"]:
    """Where a run's stages run: ``--executor``, or for ``auto``, this process when the
    run joins no Ray (:func:`joins_nothing`), uses one model (``--actors`` at most 1,
    and at most one CUDA device of the ``gpus`` torch sees unless ``--device cpu``;
    None: not known yet) and has at most :data:`~cohort.config.IN_PROCESS_MAX_SUBJECTS`
    ``subjects`` (None: the manifest could not be counted, and the plan will say why
    before anything runs)."""
    execution = cfg.execution
    if execution.executor != "auto":
        return execution.executor
    if not joins_nothing(cfg, environ, connected) or (execution.num_actors or 1) > 1:
        return "ray"
    if execution.device != "cpu" and gpus is not None and gpus > 1:
        return "ray"  # one actor per GPU
    return "in-process" if subjects is None or subjects <= IN_PROCESS_MAX_SUBJECTS else "ray"


def ensure_ray(address: str | None) -> bool:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or start a private local
    instance; True when this call started the private instance (the run owns it)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return False
    # "local": a private instance, never one a `ray start` on this machine left running
    ray.init(
        address="local",
        include_dashboard=False,
        _system_config=LOCAL_SYSTEM_CONFIG,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    return True


@dataclass(frozen=True)
class RayInstance:
    """The Ray a run used: a private local instance it started, or one it joined."""

    private: bool
    address: str  # the GCS address
    cpus: float
    gpus: float

    def describe(self) -> str:
        where = "a private local Ray" if self.private else f"the running Ray at {self.address}"
        return f"on {where} ({self.cpus:g} CPUs, {self.gpus:g} GPUs)"


def ray_instance(private: bool) -> RayInstance:
    """The connected Ray, for the run's summary and ``run.json``."""
    import ray

    resources = ray.cluster_resources()
    address = str(ray.get_runtime_context().gcs_address)
    return RayInstance(private, address, resources.get("CPU", 0.0), resources.get("GPU", 0.0))


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may use: its CPU affinity, capped by a cgroup v2 CPU quota
    (a container started with ``--cpus 2`` on a 64-core host gets 2; cgroup v1 quotas
    are not read); an in-process run sizes its torch threads by it."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 file, or one this does not understand
        pass
    return cpus


@dataclass(frozen=True)
class InProcess:
    """A run whose stages ran in the driver's process, without Ray: one model on the
    machine's CPUs, or on one GPU."""

    cpus: float
    gpus: float  # CUDA devices torch sees; in a run's record, those it used (0 or 1)

    def describe(self) -> str:
        return f"in this process, without Ray ({self.cpus:g} CPUs, {self.gpus:g} GPUs)"


class Pool(NamedTuple):
    """The feature actors of a run."""

    actors: int
    gpus: float  # per actor: 1.0 on GPU workers, else 0.0
    threads: int | None  # torch threads per actor (None: torch's own choice)

    @property
    def device(self) -> str:
        """Where the actors hold the network: ``cuda`` or ``cpu``."""
        return "cuda" if self.gpus else "cpu"


def plan_pool(cfg: RunConfig, where: RayInstance | InProcess) -> Pool:
    """Actors, GPUs per actor and torch threads per actor, from the resources of the
    Ray cluster or of this process (one model: at most one GPU)."""
    in_process = isinstance(where, InProcess)
    gpus = min(int(where.gpus), 1) if in_process else int(where.gpus)
    cpus = where.cpus or 1.0
    use_gpu = cfg.execution.device == "cuda" or (cfg.execution.device == "auto" and gpus > 0)
    if cfg.execution.device == "cuda" and gpus == 0:
        raise ConfigError(
            "--device cuda was asked for but "
            + (
                "this machine has no CUDA device torch can use; use --device auto or cpu"
                if in_process
                else "the Ray cluster has no GPU resource; use --device auto or cpu, "
                "or add GPU workers"
            )
        )
    if cfg.model.precision == "bf16" and not use_gpu:
        raise ConfigError(
            "--precision bf16 runs the network in bfloat16 on CUDA devices, and this run "
            "uses the CPU; drop --precision (fp32 is the default) or run on GPU workers "
            "with --device cuda"
        )
    actors = 1 if in_process else cfg.execution.num_actors or (gpus if use_gpu else 1)
    threads = cfg.execution.torch_threads
    if threads is None and not use_gpu:
        threads = max(1, int(cpus // actors))
    return Pool(actors, 1.0 if use_gpu else 0.0, threads)


@dataclass(frozen=True)
class ActorMemory:
    """What each feature actor asks Ray for, and how far the loaders may run ahead."""

    request_bytes: int  # Ray's ``memory`` resource of each actor
    queue_bytes: int | None  # Ray Data's object-store budget (None: Ray Data's default)
    basis: str  # how it was decided, in words (run.json, --verbose)


def actor_memory(
    sizes: InputSizes | None,
    cfg: RunConfig,
    layers: Sequence[str],
    device: str,
    actors: int,
    loaders: int = 0,
) -> ActorMemory:
    """Size the actors from the largest model input the header scan found.

    With every image sized, each actor requests the largest estimated peak
    (:func:`cohort.model.memory.estimate_peak_bytes`, plus the worker process)
    times :data:`MARGIN`, at most ``--actor-memory`` (a subject above that fails
    at its check stage); otherwise ``--actor-memory``. The loaders may hold
    :data:`QUEUE_PER_ACTOR` of the largest sized inputs per actor in the object
    store (at least :data:`QUEUE_FLOOR_BYTES`), so a long run of small volumes
    does not fill the store ahead of the actors; with none sized, Ray Data keeps
    its own budget. An input larger than the queue still passes, one at a time.
    The queue also holds one input per loader that can run at once (``loaders``,
    the cluster's CPUs over ``--loader-cpus``) and per actor: Ray Data starts a
    loader only when its output fits the budget, so a smaller one would idle
    loader CPUs that a fast (GPU) actor needs, which consumes a subject in far less
    than a loader takes to make one.
    """
    limit = int(cfg.execution.actor_memory_gb * GIB)
    if sizes is None or not sizes.largest:
        scanned = "no headers read" if sizes is None else f"{sizes.sized} of {sizes.total} sized"
        return ActorMemory(limit, None, f"--actor-memory ({scanned} by their headers)")
    model, pooling = cfg.model, cfg.pooling.mode
    windows = sizes.windows or (None,) * len(sizes.largest)  # --spacing: the stored grids
    estimates = [
        estimate_peak_bytes(
            shape,
            model.backbone,
            layers,
            pooling,
            model.precision,
            device,
            window=window,
            foreground=cfg.preprocess.normalise == "foreground",
        )
        for shape, window in zip(sizes.largest, windows, strict=True)
    ]
    ahead = max(actors * QUEUE_PER_ACTOR, loaders + actors)  # model inputs in flight
    queue = max(QUEUE_FLOOR_BYTES, ahead * max(e.inputs for e in estimates))
    if not sizes.complete:
        basis = f"--actor-memory ({sizes.sized} of {sizes.total} sized by their headers)"
        return ActorMemory(limit, queue, basis)
    peak = max(estimates, key=lambda e: e.host)
    wanted = math.ceil((peak.host + WORKER_BASE_BYTES) * MARGIN)
    dims = "x".join(str(n) for n in peak.shape)
    if wanted >= limit:
        return ActorMemory(limit, queue, f"--actor-memory (the largest input, {dims}, needs more)")
    basis = f"the largest input's estimate ({dims}) x {MARGIN:g}, all {sizes.total} sized"
    return ActorMemory(wanted, queue, basis)
