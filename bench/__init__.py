"""Benchmarks of ``cohort`` against the plain approach and the machine's limits.

``python -m bench.run`` (``make bench``) runs them; see ``bench/SCALING.md``.
"""

from __future__ import annotations

import os
import subprocess
import time


def timed(command: list[str]) -> tuple[float, str]:
    """Run a contender in its own process, timed from start to exit; returns the
    seconds and its standard output. It starts or joins Ray as its own options say (an
    inherited ``RAY_ADDRESS`` is dropped) with Ray's token auth; a failure stops the
    bench with the contender's output. Light on purpose (no torch), so that a bench's
    child processes import only what they time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "token"
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{command} failed:\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout
