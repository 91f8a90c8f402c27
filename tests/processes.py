"""Running Python in a fresh interpreter, for tests of what a process imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


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


def cluster_script(script: str, tag: str, *args: str, env: dict[str, str] | None = None) -> Any:
    """Run ``tests/<script>`` (a private Ray cluster of its own) with the test's
    environment less any Ray address or cohort setting, token auth on, and ``env``
    added; return the JSON it printed after ``tag`` (failing with its output's tail
    when it printed none)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "COHORT_"))}
    environ["RAY_AUTH_MODE"] = "token"
    environ.update(env or {})
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name(script)), *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    prefix = f"{tag} "
    line = next((x for x in done.stdout.splitlines() if x.startswith(prefix)), None)
    assert line is not None, (done.stdout + done.stderr)[-4000:]
    return json.loads(line.removeprefix(prefix))
