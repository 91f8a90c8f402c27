"""The Ray Data graph: loader tasks and feature actors, streamed to the driver.

::

    manifest rows --map(load.load_subject)--> prepared volumes    CPU tasks, streamed
        --map_batches(extract.FeatureActor)--> pooled vectors  one model per actor
        --> the driver (:mod:`cohort.execution.driver`), one row per subject

Resources (actors, GPUs, threads, memory) are decided here, where the stages
are used, not inside them.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Generator, Mapping, Sequence
from typing import Any, cast

import numpy as np

from cohort.config import RunConfig
from cohort.execution.extract import FaultHook, FeatureActor
from cohort.execution.ledger import AttemptLedger
from cohort.execution.load import load_subject
from cohort.execution.placement import LoaderPlacement
from cohort.execution.session import ActorMemory, Pool
from cohort.inputs.geometry import Reach

__all__ = ["GPU_BATCH", "IN_FLIGHT_PER_ACTOR", "IN_FLIGHT_PER_ACTOR_SPREAD", "stream"]

# subjects per call of a GPU actor: the second one's copy to the device overlaps the
# first one's pass (cohort.model.transfer); a CPU actor takes one at a time (a subject
# that kills its worker then takes no other finished subject's result with it)
GPU_BATCH = 2
# calls Ray Data may queue at each actor: the next call's blocks are fetched to the
# actor's node while it computes (2 is Ray Data 2.60's default for one thread; stated
# here so that a change of default does not change the pipeline)
IN_FLIGHT_PER_ACTOR = 2
# the same with actors on several nodes: more than the object-store budget holds
# subjects, so that an actor on a block's node always has a free slot and takes it
# (cohort.execution.placement); the budget, not this, bounds what is queued
IN_FLIGHT_PER_ACTOR_SPREAD = 64
# with actors on several nodes, how long the run waits for every actor before the first
# loader starts (without --stall-timeout)
ACTORS_START_S = 600.0


def stream(
    rows: Sequence[Mapping[str, Any]],
    weights: Mapping[str, Any],
    cfg: RunConfig,
    identity: str,
    finished: frozenset[str],
    pool: Pool,
    memory: ActorMemory,
    reach: Reach | None = None,
) -> Generator[dict[str, Any], None, None]:
    """Run the Ray Data graph on manifest ``rows`` and yield one result row per subject
    as it finishes (in the order they finish).

    ``weights`` is the 2D state dict every actor builds its network from;
    ``identity`` and ``finished`` let the loaders recognise subjects that an
    earlier run finished (they come back with status ``cached``); ``reach``
    (what the hooked layers need of the model input) lets them refuse a volume
    that is too small at the check stage; ``pool`` is the feature actors
    (:func:`cohort.execution.session.plan_pool`); ``memory`` is what each actor
    requests and how much the loaders may hold ahead of the actors
    (:func:`cohort.execution.session.actor_memory`).
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext, Dataset, ExecutionResources
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    context = DataContext.get_current()
    context.enable_progress_bars = False  # cohort's own progress says it in a user's terms
    context.print_on_execution_start = False
    # Ray Data's notes on its own progress bars and its per-dataset INFO lines say
    # nothing to a user of cohort (kept with --verbose); warnings and errors stay
    verbose = cfg.execution.progress == "verbose"
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # --stall-timeout: Ray Data's own guard stops an execution in which no block has
    # moved for that long (ExecutionTimeoutError, a stalled run for the driver); off
    # without the option
    stall = cfg.execution.stall_timeout_s
    context.execution_no_progress_timeout_s = -1 if stall is None else stall
    actors, gpus, threads = pool
    # set on every run: the context outlives a run in a process that makes several
    context.execution_options.resource_limits = ExecutionResources.for_limits(
        object_store_memory=memory.queue_bytes
    )
    retries = cfg.execution.max_retries
    # actors on several nodes: every actor up before the first loader, loaders beside
    # them, each block consumed on its node (cohort.execution.placement)
    spread = _actor_hosts(gpus > 0) > 1
    # otherwise Ray Data's default: the actors start while the loaders run
    context.wait_for_min_actors_s = int(stall or ACTORS_START_S) if spread else -1
    items = ray.data.from_items(list(rows), override_num_blocks=len(rows))
    loader = functools.partial(
        _load_here,
        cfg=cfg,
        identity=identity,
        finished=finished,
        reach=reach,
        device=pool.device,  # where the actors below hold the network
    )
    weights_ref = ray.put(dict(weights))  # owned by this frame for the whole run
    # counts each subject's attempts, so that one that kills its worker every time
    # becomes its own error row (cohort.execution.ledger); on the driver's node
    ledger = (
        ray.remote(AttemptLedger)
        .options(
            # no restarts: it lives on the driver's node, and when that node is lost
            # the run is lost with it (a restart would also need its constructor's
            # object again, which Ray warns about on every run). Pinned there (not
            # soft): with a soft affinity Ray sometimes placed it on a worker node, and
            # losing that node then failed every actor built after it
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False
            ),
        )
        .remote([weights_ref])  # nested: the ledger borrows the reference
    )
    handle: Any = ledger  # an actor handle (ray's stubs type it as the class)
    placement = LoaderPlacement(lambda: cast(dict[str, int], ray.get(handle.actor_nodes.remote())))
    with warnings.catch_warnings():
        # Ray 2.60 marks ray_remote_args_fn deprecated (removal planned for 2.64) but
        # offers no other way to set actor restarts and task retries. Pinned to 2.60.
        # Actors restart and retry their task without a limit: the ledger bounds the
        # deaths per subject, and Ray Data fails a pool whose actors die at start-up.
        warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*deprecated")
        ds: Dataset = items.map(
            loader,
            num_cpus=cfg.execution.loader_cpus,
            ray_remote_args_fn=functools.partial(
                _loader_args, placement=placement if spread else None, max_retries=retries
            ),
        )
        ds = ds.map_batches(
            FeatureActor,
            fn_constructor_kwargs={
                "cfg": cfg,
                "threads": threads,
                "fault": FaultHook.from_env(os.environ),
                "ledger": ledger,
            },
            # a batch of two may join blocks of two nodes: one at a time when spread
            batch_size=GPU_BATCH if gpus and not spread else 1,
            batch_format="numpy",
            compute=ActorPoolStrategy(
                # a fixed pool: every actor (each GPU) from the start, and none stopped
                # while idle (Ray Data scales an idle pool down to min_size, and the
                # actor on another node then takes that node's subjects)
                min_size=actors,
                max_size=actors,
                initial_size=actors,
                max_tasks_in_flight_per_actor=(
                    IN_FLIGHT_PER_ACTOR_SPREAD if spread else IN_FLIGHT_PER_ACTOR
                ),
            ),
            num_cpus=cfg.execution.actor_cpus,
            num_gpus=gpus,
            memory=memory.request_bytes,
            ray_remote_args_fn=functools.partial(
                _remote_args, max_restarts=-1, max_task_retries=-1
            ),
        )
    try:
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
            columns = cast(dict[str, np.ndarray], batch)
            row = {name: columns[name][0] for name in columns}
            placement.consumed(str(row.get("loaded_on", "")))
            yield row
    finally:
        ray.kill(ledger)  # type: ignore[arg-type]
        del weights_ref


def _load_here(row: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """The loader task (:func:`load_subject`), its row marked with the node it ran on."""
    import ray

    out = load_subject(row, **kwargs)
    out["loaded_on"] = ray.get_runtime_context().get_node_id()
    return out


def _loader_args(placement: LoaderPlacement | None, max_retries: int) -> dict[str, Any]:
    """A loader task's Ray options: its retries, and with actors on several nodes a soft
    affinity to the node :class:`LoaderPlacement` chooses (the task waits for that node's
    CPUs; it runs elsewhere only if the node is gone or cannot run it)."""
    args: dict[str, Any] = {"max_retries": max_retries}
    node = placement.choose() if placement is not None else None
    if node is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        args["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
    return args


def _actor_hosts(gpus: bool) -> int:
    """Alive nodes that can hold a feature actor: those with GPUs for a GPU pool, else
    those with CPUs."""
    import ray

    need = "GPU" if gpus else "CPU"
    return sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get(need, 0) > 0)


def _remote_args(**args: int) -> dict[str, int]:
    return dict(args)
