"""Running Python in a fresh interpreter, for tests of what a process imports."""

from __future__ import annotations

import subprocess
import sys


def python_stdout(code: str, *args: str, timeout: float = 100) -> str:
    """The standard output of ``python -c code args...``; a non-zero exit fails with its
    stderr."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}"
    return done.stdout


# Runs argv[1:] with SIGINT delivered and at its default, whatever this process has
# (a library may leave SIGINT blocked or ignored in the test process, and both are
# inherited through fork and exec: a Python child would then never see Ctrl-C).
_INTERRUPTIBLE = (
    "import os, signal, sys; "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
    "signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def interruptible(command: list[str]) -> list[str]:
    """``command`` as an argv that a SIGINT stops as it stops a command typed at a
    terminal (run through :data:`_INTERRUPTIBLE`; exec keeps the process id)."""
    return [sys.executable, "-c", _INTERRUPTIBLE, *command]
