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
