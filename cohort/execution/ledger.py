"""The run's ledger: how often each subject's extraction began (so that a subject that
kills its worker fails alone), and the weights every feature actor builds from.

A worker that dies (an out-of-memory kill, a crash in a library) is restarted by
Ray and its subject sent again. :class:`AttemptLedger`, one small actor per run
on the driver's node, counts the attempts per subject; the feature actor asks it
before each extraction (:meth:`begin`) and tells it when the subject is through
(:meth:`end`). When a subject begins again after ``retries`` deaths, the actor
does not run it: it becomes that subject's error row, and every other subject
goes on. Ray's own restart and retry limits can therefore be generous; the
ledger is what bounds the deaths per subject.

The ledger also holds a reference to the 2D state dict in the object store (the
driver owns the object for the whole run): a feature actor asks the ledger for it
when it starts and when Ray restarts it. The reference travels inside a list, so
that Ray hands the ledger the reference itself rather than the 2D weights. The
ledger lives on the driver's node and is not restarted: if that node is lost, so
is the run.

Each feature actor also tells the ledger which node it runs on (again when Ray
restarts it, perhaps elsewhere), so that the driver can put the loaders beside
the actors (:mod:`cohort.execution.placement`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["AttemptLedger", "died_message"]


class AttemptLedger:
    """Attempts per subject key (used as a Ray actor; plain Python, no torch)."""

    def __init__(self, weights: list[Any] | None = None) -> None:
        self.attempts: dict[str, int] = {}
        self.box = weights or []  # [ObjectRef of the state dict], or [] in plain tests
        self.where: dict[str, str] = {}  # actor id -> the node it runs on

    def weights(self) -> list[Any]:
        """``[ref]`` to the weights the run's actors build their network from."""
        return self.box

    def arrive(self, actor: str, node: str) -> None:
        """Actor ``actor`` (re)started on ``node``."""
        self.where[actor] = node

    def actor_nodes(self) -> dict[str, int]:
        """{node id: actors that last said they run there}."""
        counts: dict[str, int] = {}
        for node in self.where.values():
            counts[node] = counts.get(node, 0) + 1
        return counts

    def begin(self, key: str) -> int:
        """Count one more attempt at ``key``; returns the number of this attempt (1, 2, ...)."""
        self.attempts[key] = self.attempts.get(key, 0) + 1
        return self.attempts[key]

    def end(self, key: str) -> None:
        """``key`` is through (done or failed): its count is no longer needed."""
        self.attempts.pop(key, None)


def died_message(subject_id: str, deaths: int) -> str:
    """The error message of a subject whose worker died on every attempt."""
    times = "once" if deaths == 1 else f"{deaths} times"
    return (
        f"the worker process died {times} on subject {subject_id} (an out-of-memory "
        "kill or a crash in a library, while extracting this subject); it was not tried "
        "again so that the others could go on. The cause of each death is in the Ray logs "
        "of its node (raylet.out, dmesg for OOM kills); for memory, give actors more "
        "(--actor-memory), resample coarser (--spacing) or crop (--crop-margin)"
    )
