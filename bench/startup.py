"""Whole-process comparison on a small cohort: the plain loop against ``cohort run``.

    python -m bench.startup --subjects 22 --shape 96,128,128

Each contender runs as its own process, one after the other, timed from start to
exit (imports, Ray, model builds and the loop all count): ``python -m
bench.baseline`` (the origin protocol written plainly, bench/baseline.py),
``cohort run --pooling masked-input`` and ``cohort run`` (masked-pool), with
seeded random weights, on the same phantom cohort. Prints the seconds and the
ratios to the loop (the issue's goals: masked-pool >= 2.5x, masked-input >= 1.3x),
and where cohort's time went (run.json's timings).

cohort runs with its default executor (``auto``: a cohort this small runs in
its own process, without Ray); ``--executor ray`` measures it on a private Ray
per run, and ``--address auto`` joining a Ray instance that is already running
(``ray start --head`` beforehand). The executor each run used is printed from
its run.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import get_args

from bench import timed
from bench.run import phantom_cohort
from cohort.config import Executor

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", type=int, default=22)
    p.add_argument("--shape", default="96,128,128")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--address", help="join this running Ray (e.g. auto) instead of a private one")
    p.add_argument("--executor", choices=get_args(Executor), default="auto")
    args = p.parse_args(argv)
    d, h, w = (int(x) for x in args.shape.split(","))
    folder = Path(tempfile.mkdtemp(prefix="startup-"))
    manifest = phantom_cohort(folder, args.subjects, (d, h, w))
    cohort = [sys.executable, "-m", "cohort", "run", str(manifest), "--weights", "random"]
    cohort += ["--quiet", "--no-report"]
    cohort += ["--executor", args.executor]
    if args.address:
        cohort += ["--address", args.address]
    rounds: list[dict[str, tuple[float, dict[str, object]]]] = []
    for r in range(args.rounds):
        outs = {"cohort masked-input": folder / f"mi{r}", "cohort masked-pool": folder / f"mp{r}"}
        contenders = {
            "plain loop": [sys.executable, "-m", "bench.baseline", str(manifest)],
            "cohort masked-input": [*cohort, "--pooling", "masked-input"],
            "cohort masked-pool": cohort,
        }
        measured: dict[str, tuple[float, dict[str, object]]] = {}
        for name, command in contenders.items():
            out = outs.get(name)
            seconds, _ = timed(command if out is None else [*command, "--out", str(out)])
            run_json = None if out is None else out / "run.json"
            ran = json.loads(run_json.read_text()) if run_json else {}
            timings = {"executor": ran["executor"], **ran["timings"]} if ran else {}
            measured[name] = (seconds, timings)
        rounds.append(measured)
        loop = measured["plain loop"][0]
        said = ", ".join(f"{n} {t:.1f} s ({loop / t:.2f}x)" for n, (t, _) in measured.items())
        print(f"round {r + 1}: {said}", flush=True)
    where = f"--executor {args.executor}" + (f" --address {args.address}" if args.address else "")
    print(f"\n{args.subjects} subjects of {args.shape}, whole processes ({where}), ", end="")
    print(f"best of {args.rounds}:")
    base = min(m["plain loop"][0] for m in rounds)
    for name in rounds[0]:
        seconds, timings = min((m[name] for m in rounds), key=lambda st: st[0])
        print(f"  {name:<22} {seconds:7.1f} s  {base / seconds:5.2f}x the plain loop")
        if timings:
            print(f"    its run.json timings: {timings}")


if __name__ == "__main__":
    main()
