"""Whole-process comparison on a small cohort: the plain loop against ``cohort run``.

    python -m bench.startup --subjects 22 --shape 96,128,128

Each contender runs as its own process, one after the other, timed from start to
exit (imports, Ray, model builds and the loop all count): ``python -m
bench.baseline`` (the origin protocol written plainly, bench/baseline.py),
``cohort run --pooling masked-input`` and ``cohort run`` (masked-pool), with
seeded random weights, on the same phantom cohort. Prints the seconds and the
ratios to the loop (the issue's goals: masked-pool >= 2.5x, masked-input >= 1.3x),
and where cohort's time went (run.json's timings).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.run import phantom_cohort

ROOT = Path(__file__).resolve().parents[1]


def timed(command: list[str]) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_AUTH_MODE"] = "token"
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{command} failed:\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout + done.stderr


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", type=int, default=22)
    p.add_argument("--shape", default="96,128,128")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args(argv)
    d, h, w = (int(x) for x in args.shape.split(","))
    folder = Path(tempfile.mkdtemp(prefix="startup-"))
    manifest = phantom_cohort(folder, args.subjects, (d, h, w))
    cohort = [sys.executable, "-m", "cohort", "run", str(manifest), "--weights", "random"]
    cohort += ["--quiet", "--no-report"]
    rows: dict[str, list[float]] = {}
    timings: dict[str, dict[str, float]] = {}
    for r in range(args.rounds):
        masked_input = [*cohort, "--pooling", "masked-input", "--out", str(folder / f"mi{r}")]
        for name, command in (
            ("plain loop", [sys.executable, "-m", "bench.baseline", str(manifest)]),
            ("cohort masked-input", masked_input),
            ("cohort masked-pool", [*cohort, "--out", str(folder / f"mp{r}")]),
        ):
            seconds, _ = timed(command)
            rows.setdefault(name, []).append(seconds)
            out = folder / ("mi" if "input" in name else "mp") / ""
            run_json = Path(str(out).rstrip("/") + str(r)) / "run.json"
            if run_json.is_file():
                timings[name] = json.loads(run_json.read_text())["timings"]
            print(f"round {r + 1}: {name}: {seconds:.1f} s", flush=True)
    base = min(rows["plain loop"])
    print(f"\n{args.subjects} subjects of {args.shape}, whole processes, best of {args.rounds}:")
    for name, values in rows.items():
        best = min(values)
        print(f"  {name:<22} {best:7.1f} s  {base / best:5.2f}x the plain loop")
    for name, t in timings.items():
        print(f"  {name} run.json timings: {t}")


if __name__ == "__main__":
    main()
