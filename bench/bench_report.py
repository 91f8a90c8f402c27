"""Benchmark: the report of a 200-subject run must be written in under 30 s.

Builds a synthetic result folder (two cohorts of 100, three layers of 32
channels like DenseNet121's last dense layers, two failed subjects, the run's
default statistics settings), then times :func:`cohort.report.write_report`.

Run: ``.venv/bin/python -m bench.bench_report [--subjects 200] [--limit 30]``.
Exit status 1 when the report takes longer than the limit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from cohort.config import StatsConfig
from cohort.report import write_report
from cohort.synthetic import synthetic_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=200, help="Subjects in all (2 cohorts).")
    parser.add_argument("--limit", type=float, default=30.0, help="Seconds allowed.")
    parser.add_argument("--channels", type=int, default=32, help="Vector length per layer.")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        started = time.perf_counter()
        folder = synthetic_results(
            Path(tmp) / "results",
            n_per_cohort=args.subjects // 2,
            channels=args.channels,
            failed=1,
            cfg=StatsConfig(permutations=199),
        )
        setup = time.perf_counter() - started
        started = time.perf_counter()
        path = write_report(folder)
        seconds = time.perf_counter() - started
        size = path.stat().st_size / 1e6
    ok = seconds < args.limit
    print(
        f"report of {args.subjects + 2} subjects ({args.subjects} done, 2 failed): "
        f"{seconds:.1f} s (limit {args.limit:g} s, {'ok' if ok else 'TOO SLOW'}); "
        f"report.html {size:.1f} MB; synthetic folder built in {setup:.1f} s"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
