"""The memory an in-process run has: this machine's, its cgroup's, less what it holds.

A run in ``cohort``'s own process (:mod:`cohort.execution.inprocess`) has no
feature actor and no ``--actor-memory``: a subject is sized against
:func:`in_process_budget`, the lower of

- the machine's available memory, ``MemAvailable`` of ``/proc/meminfo`` (the
  kernel's estimate of what can be allocated without swapping; it already
  leaves out what running processes hold, this one included), and
- the cgroup's memory limit (cgroup v2 ``memory.max``, v1
  ``memory.limit_in_bytes``; the lowest along the cgroup's path to the root,
  where one is set) less this process's resident memory (``VmRSS`` of
  ``/proc/self/status``), since the limit counts the process itself.

Read once, when the run starts (the network built, no subject loaded), so that
the check does not depend on what the subjects before it left in the allocator.
:func:`read_host_memory` is the thin reader (``root`` lets tests give it fake
files); :func:`in_process_budget` is pure. Where neither limit can be read (not
Linux), the budget is ``--actor-memory``'s, as on Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cohort.config import RunConfig
from cohort.model.memory import GIB, Budget, actor_budget

__all__ = ["UNLIMITED", "HostMemory", "in_process_budget", "read_host_memory"]

UNLIMITED = 2**60  # a cgroup v1 limit at or above this is "no limit" (v1 writes ~2^63)


@dataclass(frozen=True)
class HostMemory:
    """What this machine and this process's cgroup say, in bytes (None: not known)."""

    available: int | None  # MemAvailable of /proc/meminfo
    cgroup_limit: int | None  # the lowest memory limit along the cgroup's path; None: none
    cgroup_file: str  # the file that limit came from
    rss: int | None  # this process's resident memory (VmRSS)


def _gb(n: float) -> str:
    return f"{n / GIB:.2f} GB"


def in_process_budget(host: HostMemory, cfg: RunConfig) -> Budget:
    """What one subject may need in this process: the lower of ``MemAvailable`` and
    the cgroup limit less the process's resident memory (see the module docstring),
    named in :attr:`Budget.source`; ``--actor-memory``'s budget when neither is known."""
    options: list[tuple[int, str]] = []
    if host.available is not None:
        options.append(
            (host.available, "this machine's available memory (MemAvailable, /proc/meminfo)")
        )
    if host.cgroup_limit is not None:
        rss = host.rss or 0
        options.append(
            (
                host.cgroup_limit - rss,
                f"the cgroup's memory limit {_gb(host.cgroup_limit)} ({host.cgroup_file}) "
                f"less the {_gb(rss)} this process holds",
            )
        )
    if not options:
        fallback = actor_budget(cfg)
        return Budget(
            fallback.bytes,
            fallback.reserved,
            f"{fallback.source}, used since this machine's free memory cannot be read here",
        )
    size, source = min(options)
    return Budget(max(size, 0), 0, f"the {_gb(max(size, 0))} it has: {source}", in_process=True)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _kib_field(text: str | None, name: str) -> int | None:
    """``name:   123 kB`` of a /proc file, in bytes."""
    for line in (text or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            try:
                return int(value.split()[0]) * 1024
            except (IndexError, ValueError):
                return None
    return None


def _limit(path: Path) -> int | None:
    text = _read(path)
    if text is None or text.strip() == "max":
        return None
    try:
        value = int(text.strip())
    except ValueError:
        return None
    return value if value < UNLIMITED else None


def _cgroup_limit(root: Path) -> tuple[int | None, str]:
    """The lowest memory limit on this process's cgroup path (v2 and v1), and its file."""
    found: list[tuple[int, str]] = []
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, cgroup = parts
        if controllers == "":  # cgroup v2, the unified hierarchy
            mount, name = root / "sys/fs/cgroup", "memory.max"
        elif "memory" in controllers.split(","):
            mount, name = root / "sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        folder = mount / cgroup.strip().lstrip("/")
        while True:  # the cgroup and each parent: the lowest limit holds
            limit = _limit(folder / name)
            if limit is not None:
                found.append((limit, str(Path("/") / (folder / name).relative_to(root))))
            if folder == mount or mount not in folder.parents:
                break
            folder = folder.parent
    if not found:
        return None, ""
    limit, source = min(found)
    return limit, source


def read_host_memory(root: Path = Path("/")) -> HostMemory:
    """This machine's ``MemAvailable``, this process's cgroup limit and resident memory,
    from ``/proc`` and ``/sys/fs/cgroup`` under ``root``; what cannot be read is None."""
    limit, source = _cgroup_limit(root)
    return HostMemory(
        available=_kib_field(_read(root / "proc/meminfo"), "MemAvailable"),
        cgroup_limit=limit,
        cgroup_file=source,
        rss=_kib_field(_read(root / "proc/self/status"), "VmRSS"),
    )
