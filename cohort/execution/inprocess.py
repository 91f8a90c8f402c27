"""The in-process executor: the pipeline's two stages in the driver's own process.

::

    manifest rows --load.load_subject (loader threads, two subjects ahead)-->
        --extract.Features (the plan's network, one subject at a time)-->
        --> the driver (:mod:`cohort.execution.driver`), one row per subject

The same stage functions as the Ray graph (:mod:`cohort.execution.graph`), without
its start-up: on 2 CPUs, starting a private Ray, its worker processes and a feature
actor that imports torch anew takes 10-12 s before the first subject
(bench/SCALING.md), more than a pilot study's whole computation. The driver picks
this executor for a small local run (:func:`cohort.execution.session.pick_executor`).

What it gives up against Ray: the loaders are threads of this process, not
processes of their own; and a subject that kills its worker (an out-of-memory
kill, a crash in a library) ends the run, where Ray restarts the actor. Every
finished subject is in its part file by then, so rerunning the same command
continues. What one subject may need is bounded by the memory this machine has
available when the run starts (:mod:`cohort.execution.machine`), and
``--stall-timeout`` covers a read that hangs (not the model, which runs on the
driver's own thread).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Generator, Mapping, Sequence
from typing import Any

import torch

from cohort.config import RunConfig
from cohort.errors import StalledError
from cohort.execution.extract import FaultHook, Features
from cohort.execution.load import load_subject
from cohort.execution.session import Pool
from cohort.inputs.geometry import Reach
from cohort.model.memory import Budget

__all__ = ["AHEAD", "LOADER_THREADS", "stream"]

LOADER_THREADS = 2  # loading is a few tens of ms of CPU per small subject
# loaded subjects that may wait for the model. Loading is far quicker than the model
# (34 ms of CPU against 0.37 s at 96x128x128; a few s against 23 s at 512x512x216),
# and each waiting subject is held in this process: 0.3 GB at 512x512x216
AHEAD = 2


def stream(
    rows: Sequence[Mapping[str, Any]],
    network: torch.nn.Module,
    cfg: RunConfig,
    identity: str,
    finished: frozenset[str],
    pool: Pool,
    reach: Reach | None = None,
    budget: Budget | None = None,
) -> Generator[dict[str, Any], None, None]:
    """Load and extract manifest ``rows`` in this process; yield one result row per
    subject as it finishes (in the order they finish), as
    :func:`cohort.execution.graph.stream` does.

    ``network`` is the plan's inflated network (built once, on the driver);
    ``identity``, ``finished`` and ``reach`` are the loaders' (see
    :func:`cohort.execution.load.load_subject`); ``pool`` gives the torch threads
    (the caller's are given back at the end) and the device of the loaders' memory
    check, which is where :class:`~cohort.execution.extract.Features` puts the
    network (both follow ``--device``); ``budget`` is what a subject may need in
    this process (:func:`cohort.execution.machine.in_process_budget`). The model
    runs on the calling thread, so Ctrl-C stops it between two operations; loaders
    run in :data:`LOADER_THREADS` daemon threads, at most :data:`AHEAD` subjects
    ahead. With ``--stall-timeout``, that long without a finished load while some are pending raises
    :class:`~cohort.errors.StalledError` (a stuck thread is left behind: it cannot
    be stopped, and it writes nothing); a read that hangs holds up only its subject.
    """
    threads = torch.get_num_threads()
    if pool.threads is not None:
        torch.set_num_threads(pool.threads)
    try:
        fault = FaultHook.from_env(os.environ)  # the test hook, as the Ray actors have it
        features = Features(network, cfg, None, "in-process, without Ray", fault)

        def load(row: Mapping[str, Any]) -> dict[str, Any]:
            return load_subject(
                dict(row), cfg, identity, finished, reach=reach, device=pool.device, budget=budget
            )

        for loaded in _ahead(load, rows, cfg.execution.stall_timeout_s):
            result = features(loaded)
            del loaded  # its model input, not held while the next one is awaited
            yield result
    finally:
        torch.set_num_threads(threads)


def _ahead(
    load: Any, rows: Sequence[Mapping[str, Any]], timeout: float | None = None
) -> Generator[dict[str, Any], None, None]:
    """``load`` of each row, in the order the loads finish, by :data:`LOADER_THREADS`
    daemon threads that run at most :data:`AHEAD` rows ahead of the consumer; a wait
    of more than ``timeout`` seconds for any pending load raises ``StalledError``."""
    todo: queue.Queue[Mapping[str, Any]] = queue.Queue()
    for row in rows:
        todo.put(row)
    slots = threading.Semaphore(AHEAD)  # loading or loaded, not yet taken by the consumer
    loaded: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()

    def loader() -> None:
        while True:
            slots.acquire()
            if stop.is_set():
                return
            try:
                row = todo.get_nowait()
            except queue.Empty:
                return
            if stop.is_set():  # closed while this thread took the row
                return
            try:
                value: Any = load(row)
            except BaseException as err:  # load_subject makes rows of its errors; not these
                value = err
            loaded.put(value)
            del value

    # daemon threads: a hung read must not keep the process from exiting
    count = min(LOADER_THREADS, len(rows))
    for n in range(count):
        threading.Thread(target=loader, name=f"cohort-load-{n}", daemon=True).start()
    try:
        for _ in range(len(rows)):
            try:
                value = loaded.get(timeout=timeout)
            except queue.Empty:
                raise StalledError(
                    f"nothing moved for {timeout:g} s (--stall-timeout), so the run "
                    "stopped; reading a subject's files hung"
                ) from None
            slots.release()
            if isinstance(value, BaseException):
                raise value
            yield value
            del value
    finally:  # wake loaders that wait for a slot, so that they see the stop and end
        stop.set()
        for _ in range(count):
            slots.release()
