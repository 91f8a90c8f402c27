"""Loaders beside their actors: a prepared subject is consumed on the node that made it.

A prepared full-size subject is 170 MB (int16 HU and the uint8 region index);
on a cluster of several GPU nodes, sending it to another node's actor costs
the network what a GPU consumes in a fraction of the time. Two parts keep it
on its node (:mod:`cohort.execution.graph` wires them):

- Ray Data 2.60 hands a block to an actor on the block's node whenever one
  there has a free slot, else to the least busy actor anywhere. The graph lets
  each actor queue more calls than the object-store budget can hold subjects
  (:data:`cohort.execution.graph.IN_FLIGHT_PER_ACTOR`) and waits for every
  actor before the first loader starts, so a node's actor always has a free
  slot: a block made on a node with an actor is consumed there.
- :class:`LoaderPlacement` puts each loader task on a node that holds actors
  (Ray's soft node affinity: the task waits for that node's CPUs, and runs
  elsewhere only when the node is gone or cannot run it), the node with the
  least unconsumed work per actor first, so each node makes what its own actors
  consume and no node's actors wait while another's queue fills the budget.

With actors on one node only (every single-machine run) it places nothing and
Ray's own scheduling is kept. Pure Python: the nodes come from a callable (the
run's ledger, which every actor tells where it runs), so it is tested without
Ray (``tests/test_placement.py``) and on two raylets
(``tests/test_locality.py``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping

__all__ = ["LoaderPlacement"]


class LoaderPlacement:
    """Chooses the node of each loader task from the nodes that hold actors.

    ``actor_nodes`` returns {node id: actors on it}; it is asked again at most
    every ``refresh_s`` seconds (actors restart elsewhere when a node is lost).
    :meth:`choose` is called when a loader task is submitted (Ray Data's
    executor thread), :meth:`consumed` when its subject's result reaches the
    driver (the driver's thread): a lock keeps the counts whole.
    """

    def __init__(
        self,
        actor_nodes: Callable[[], Mapping[str, int]],
        refresh_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._actor_nodes = actor_nodes
        self._refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._nodes: dict[str, int] = {}
        self._asked_at: float | None = None
        self.launched: Counter[str] = Counter()  # loader tasks placed per node
        self.done: Counter[str] = Counter()  # of those, consumed per node

    def choose(self) -> str | None:
        """The node for the next loader task, or None (Ray chooses) while the actors are
        on fewer than two nodes."""
        with self._lock:
            nodes = self._current_nodes()
            if len(nodes) < 2:
                return None
            node = min(
                sorted(nodes),  # a fixed order, so that ties go to the same node each time
                key=lambda n: (
                    (self.launched[n] - self.done[n]) / nodes[n],
                    self.launched[n] / nodes[n],
                ),
            )
            self.launched[node] += 1
            return node

    def consumed(self, node: str) -> None:
        """A subject loaded on ``node`` was consumed (its result reached the driver)."""
        with self._lock:
            self.done[node] += 1

    def _current_nodes(self) -> dict[str, int]:
        now = self._clock()
        if self._asked_at is None or now - self._asked_at >= self._refresh_s:
            self._nodes = {n: int(a) for n, a in self._actor_nodes().items() if int(a) > 0}
            self._asked_at = now
        return self._nodes
