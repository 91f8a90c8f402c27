"""Scale simulation: ``cohort stats`` on synthetic result folders of many subjects.

For each size, writes a synthetic result folder (two cohorts of equal size,
three regions, three layers of 32 channels, no phantom images; made with no
resampling, so the folder is quick to write), then runs
``cohort stats DIR --bootstrap 2000 --permutations 999 --stats-seed 0`` (the
default statistics settings, stated explicitly because the folder was written
without resampling) in a child process, and prints its wall time and peak
memory (the child's maximum resident set size, from
``resource.getrusage(RUSAGE_CHILDREN)`` read right after it ends).

Each size runs twice: unadjusted (``--covariates ''``), then adjusted for two
covariates (``--covariates age,sex --subjects-table DIR/subjects.csv``: age
continuous, sex categorical; issue 24), with the same default statistics.

Run: ``.venv/bin/python -m bench.stats_scale --subjects 2000,20000,100000``.
``--keep DIR`` writes the folders under DIR and keeps them (reused when
present); ``--python`` picks the interpreter of the child (with
``PYTHONPATH`` set, an older checkout can be measured on the same folders).
Exit status 1 when a child fails, when a size up to 20,000 subjects misses
the goal of issue 16 (60 s and 3 GB on the 2-core bench machine), or when the
adjusted case misses issue 24's (up to 20,000 subjects: within 3x the
unadjusted time; any size: within 3 GB).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

GOAL_SUBJECTS = 20_000
GOAL_SECONDS = 60.0
GOAL_BYTES = 3 * 1024**3
GOAL_ADJUSTED_RATIO = 3.0  # adjusted time / unadjusted time, up to GOAL_SUBJECTS
ADJUSTED = ("--covariates", "age,sex")


@dataclass(frozen=True)
class Measured:
    case: str  # "plain" or "adjusted"
    subjects: int
    seconds: float
    peak_bytes: int
    setup_seconds: float
    returncode: int
    cpu_seconds: (
        float  # the child's user + system CPU time: steadier than wall time on a busy machine
    )


def make_folder(folder: Path, subjects: int) -> float:
    """Write the synthetic folder of ``subjects`` (kept when it is there); seconds taken."""
    from cohort.config import StatsConfig
    from cohort.synthetic import synthetic_results

    if (folder / "run.json").is_file():
        return 0.0
    started = time.perf_counter()
    synthetic_results(
        folder,
        n_per_cohort=subjects // 2,
        images=False,
        cfg=StatsConfig(bootstrap=0, permutations=0),
        subjects_table=True,
    )
    return time.perf_counter() - started


def run_stats(
    folder: Path, python: str, extra: tuple[str, ...] = ()
) -> tuple[float, int, int, float]:
    """Run ``cohort stats`` on ``folder`` in a child; (seconds, peak RSS bytes, exit status,
    CPU seconds).

    The peak is the child's own: this process runs one child at a time, and
    RUSAGE_CHILDREN's ru_maxrss is the largest of the children waited for so
    far, so each measurement runs in a fresh intermediate process.
    """
    code = (
        "import resource, subprocess, sys, time\n"
        "started = time.perf_counter()\n"
        "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
        "seconds = time.perf_counter() - started\n"
        "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(seconds, usage.ru_maxrss * 1024, done.returncode, usage.ru_utime + usage.ru_stime)\n"
    )
    command = [
        python,
        "-c",
        "from cohort.cli.main import main; main()",
        "stats",
        str(folder),
        "--bootstrap",
        "2000",
        "--permutations",
        "999",
        "--stats-seed",
        "0",
        *extra,
    ]
    out = subprocess.run(
        [sys.executable, "-c", code, *command], capture_output=True, text=True, check=True
    )
    seconds, peak, status, cpu = out.stdout.split()
    return float(seconds), int(peak), int(status), float(cpu)


def measure(sizes: list[int], root: Path, python: str, adjusted: bool) -> list[Measured]:
    """Every size unadjusted (the issue-16 table), then, when asked, every size adjusted."""
    rows: list[Measured] = []
    plain: dict[int, Measured] = {}
    for subjects in sizes:
        folder = root / f"stats-{subjects}"
        setup = make_folder(folder, subjects)
        seconds, peak, status, cpu = run_stats(folder, python, ("--covariates", ""))
        rows.append(Measured("plain", subjects, seconds, peak, setup, status, cpu))
        plain[subjects] = rows[-1]
        print(format_row(rows[-1], rows[-1]), flush=True)
    if not adjusted:
        return rows
    print(f"\nadjusted for age + sex ({' '.join(ADJUSTED)} --subjects-table DIR/subjects.csv);")
    print("ratio: over the plain run of the same folder (wall time, then CPU time)")
    print("|  subjects |   time s | peak GB | setup s | goal   |  CPU s |  ratio | CPU ratio |")
    print("|----------:|---------:|--------:|--------:|:-------|-------:|-------:|----------:|")
    for subjects in sizes:
        folder = root / f"stats-{subjects}"
        extra = (*ADJUSTED, "--subjects-table", str(folder / "subjects.csv"))
        seconds, peak, status, cpu = run_stats(folder, python, extra)
        rows.append(Measured("adjusted", subjects, seconds, peak, 0.0, status, cpu))
        print(format_row(rows[-1], plain[subjects]), flush=True)
    return rows


def missed(row: Measured, plain: Measured) -> bool:
    """Whether ``row`` misses its goal (issue 16 for plain, issue 24 for adjusted)."""
    if row.case == "adjusted":
        slow = row.subjects <= GOAL_SUBJECTS and row.seconds > GOAL_ADJUSTED_RATIO * plain.seconds
        return slow or row.peak_bytes > GOAL_BYTES
    over = row.seconds > GOAL_SECONDS or row.peak_bytes > GOAL_BYTES
    return row.subjects <= GOAL_SUBJECTS and over


def format_row(row: Measured, plain: Measured) -> str:
    goal = "MISSED" if missed(row, plain) else "ok"
    if row.case == "plain" and row.subjects > GOAL_SUBJECTS:
        goal = ""
    ratio = f" {row.cpu_seconds:>6.1f} |"
    if row.case == "adjusted":
        cpu = row.cpu_seconds / plain.cpu_seconds
        ratio += f" {row.seconds / plain.seconds:>5.2f}x | {cpu:>8.2f}x |"
    status = "" if row.returncode == 0 else f" exit {row.returncode}"
    return (
        f"| {row.subjects:>9,} | {row.seconds:>8.1f} | {row.peak_bytes / 1e9:>6.2f} | "
        f"{row.setup_seconds:>7.1f} | {goal:<6} |{ratio}{status}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--subjects", default="2000,20000", help="Comma-separated subject counts (all cohorts)."
    )
    parser.add_argument("--keep", type=Path, help="Write and keep the folders here.")
    parser.add_argument("--python", default=sys.executable, help="Interpreter of the child.")
    parser.add_argument(
        "--plain-only", action="store_true", help="Skip the adjusted case (issue 24)."
    )
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.subjects.split(",") if s.strip()]
    print(
        f"cohort stats, default statistics (2000 bootstrap, 999 permutations); "
        f"{os.cpu_count()} CPUs; goals: plain <= 20,000 subjects within 60 s and 3 GB; "
        "adjusted (age + sex) within 3x plain up to 20,000 subjects and 3 GB at any size"
    )
    print("|  subjects |   time s | peak GB | setup s | goal   |  CPU s |")
    print("|----------:|---------:|--------:|--------:|:-------|-------:|")
    adjusted = not args.plain_only
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        rows = measure(sizes, args.keep, args.python, adjusted)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-stats-") as tmp:
            rows = measure(sizes, Path(tmp), args.python, adjusted)
    failed = any(r.returncode != 0 for r in rows)
    plain = {r.subjects: r for r in rows if r.case == "plain"}
    short = any(missed(r, plain[r.subjects]) for r in rows)
    return 1 if failed or short else 0


if __name__ == "__main__":
    sys.exit(main())
