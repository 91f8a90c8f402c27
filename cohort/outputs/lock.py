"""One writer per output folder: an exclusive lock held while a command writes there.

``cohort run`` (in-process or on Ray), ``cohort stats DIR`` and ``cohort report``
(when it writes into the run's folder) hold :func:`hold` on the folder for as long
as they write. The lock is ``fcntl.flock`` on ``<folder>/.cohort/lock``, a file
whose text says who holds it (pid, host, start time, the command); a second
command on the folder is refused at once with those, instead of both writing the
same files. The kernel drops an ``flock`` when the process that took it ends, by
any means (a SIGKILL, an out-of-memory kill), so a dead run leaves a stale record
but never a lock: the next command takes it and overwrites the record.

The lock file is never removed while the folder is in use (removing it would let
two processes lock two different files of the same name); the one exception is a
folder the lock itself created and nothing else wrote into, which is removed
again on release, so a command refused before any work leaves no folder behind.

``flock`` holds between processes of one machine; on NFS it depends on the
server (Linux clients map it to POSIX locks, NFSv4 servers honour them), so
two runs on two nodes writing one NFS folder may not see each other's lock.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cohort.errors import OutputError
from cohort.outputs.store import STATE_DIR

__all__ = ["LOCK_NAME", "FolderLockedError", "Holder", "hold", "read_holder"]

LOCK_NAME = "lock"  # in the folder's state folder (store.STATE_DIR)


class FolderLockedError(OutputError):
    """Another live process holds the output folder's lock."""


def _lock_path(folder: Path) -> Path:
    return folder / STATE_DIR / LOCK_NAME


@dataclass(frozen=True)
class Holder:
    """What a lock file says about its holder (empty strings where it says nothing)."""

    pid: str = ""
    host: str = ""
    started: str = ""  # local time, ISO 8601 with its UTC offset
    command: str = ""

    @classmethod
    def this_process(cls, command: Sequence[str]) -> Holder:
        return cls(
            str(os.getpid()),
            socket.gethostname(),
            time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            " ".join(command),
        )

    def describe(self) -> str:
        if not self.pid:
            return "another process (it has not written who it is yet: it is starting)"
        return (
            f"pid {self.pid} on host {self.host or '?'}, started {self.started or '?'} "
            f"(`{self.command}`)"
        )


def read_holder(folder: Path) -> Holder:
    """The record in ``folder``'s lock file (empty when there is none or it is unreadable)."""
    try:
        data = json.loads(_lock_path(Path(folder)).read_text() or "{}")
    except (OSError, ValueError):
        return Holder()
    if not isinstance(data, dict):
        return Holder()
    return Holder(**{name: str(data.get(name, "")) for name in Holder.__dataclass_fields__})


def _missing(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    path = folder.absolute()
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing


@contextmanager
def hold(folder: Path, command: Sequence[str]) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (made if missing) for the ``with`` block.

    ``command`` (the command line, as words) goes into the lock file's record with
    this process's pid, host and start time. Raises :class:`FolderLockedError`,
    naming the holder and the fix, when a live process holds it. Yields the lock
    file's path.
    """
    folder = Path(folder)
    created = _missing(folder)
    path = _lock_path(folder)
    created = [*([path.parent] if not path.parent.exists() else []), *created]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(
            f"cannot make the output folder {folder} ({err}); give a folder you can write to"
        ) from None
    fd = _acquire(path, folder)
    try:
        os.ftruncate(fd, 0)
        record = dataclasses.asdict(Holder.this_process(command))
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        yield path
    finally:
        if created and _only_lock(folder, path):
            path.unlink(missing_ok=True)  # still held: nobody can lock this file meanwhile
            for made in created:
                try:
                    made.rmdir()
                except OSError:  # something was written after all: keep it
                    break
        else:
            os.ftruncate(fd, 0)  # released: no record of a holder that is gone
        os.close(fd)


def _acquire(path: Path, folder: Path) -> int:
    """An open descriptor of ``path`` holding its ``flock``; refused when held."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderLockedError(
                f"output folder {folder} is in use by {read_holder(folder).describe()}; "
                "two commands writing one folder would mix their files. Wait for it to end "
                "(or stop it), or give another output folder; a process that has ended "
                "holds no lock, so nothing needs to be deleted"
            ) from None
        except OSError as err:
            os.close(fd)
            raise OutputError(
                f"cannot lock the output folder {folder} ({path}: {err}); give a folder on "
                "a file system that supports flock"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the file was removed by its last holder between open and lock


def _only_lock(folder: Path, path: Path) -> bool:
    """True when ``folder`` holds nothing but the lock file (in its state folder)."""
    try:
        return [p.name for p in folder.iterdir()] == [path.parent.name] and [
            p.name for p in path.parent.iterdir()
        ] == [path.name]
    except OSError:
        return False
