"""Scale simulation: ``cohort run`` on phantom cohorts of thousands of small subjects.

Issue 16's pipeline bench: N phantom knees of 64^3 voxels (two cohorts,
alternating, so every prefix of the manifest is balanced) go through
``cohort run`` in a child process with random weights on the CPU, and for each
N the bench reports

* wall time of the whole command, and the streaming window (first result to
  the last, from ``run.json``'s timings);
* the driver's peak resident memory: the child *is* the driver (``python -c``
  calling the ``cohort`` entry point, as the console script does), and it
  reports its own ``VmHWM`` from ``/proc/self/status`` at exit; a sampler also
  reads ``VmRSS``/``VmHWM``/``RssShmem`` every 0.25 s (the peak is the larger of
  the two, since interpreter teardown runs after the exit report). ``RssShmem``
  is the part of Ray's shared object store (``/dev/shm/plasma*``, mapped whole
  into the driver) whose pages the driver has touched: shared with the raylet,
  bounded by the store's size, and not memory the driver holds; so the table
  also gives the driver's private peak (``VmRSS - RssShmem``) and its private
  memory at the first and the last result (before the reducer and statistics
  run in the same process);
* the driver's own work: its CPU seconds (all its threads, including Ray
  Data's executor; not Ray's worker processes) in the streaming window divided
  by the subjects that arrived in it, and its total CPU seconds;
* the files written under ``--out`` (part files included), the number of folders
  holding them and the most files in one folder.

The phantoms are generated once, for the largest N (two processes; 64^3 takes
about 0.2 s a subject, so 5,000 subjects take some minutes), and smaller runs
use a prefix of that manifest. Generation is resumable in chunks of 100.

Run: ``.venv/bin/python -m bench.pipeline_scale --subjects 500,5000 --keep
bench/results/pipeline-scale`` (``bench/results`` is git-ignored; without
``--keep`` everything goes to a temporary folder that is removed). ``--json``
writes every figure with the memory timeline. Exit status 1 when a run fails,
or when the driver's peak at the largest N is more than 20 % above the one at
the smallest (the goal of issue 16).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GOAL_RATIO = 1.20
CHUNK = 100
SAMPLE_S = 0.25
COHORTS = ("control", "osteo")
SPACING_MM = (1.5, 0.8, 0.8)
# random weights on the CPU, no report; statistics kept small (they are not the subject
# here: bench/stats_scale.py measures them), a stall timeout long enough for a slow start
RUN_OPTIONS = (
    "--weights random --device cpu --quiet --no-report --bootstrap 200 --permutations 99 "
    "--stall-timeout 900"
)
# the driver: the cohort entry point, plus a report of its own peak memory and CPU at exit
DRIVER = """\
import atexit, json, os, sys
report = sys.argv.pop(1)
def _report():
    fields = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
    t = os.times()
    with open(report, "w") as f:
        json.dump({"vmhwm_kib": int(fields["VmHWM"].split()[0]), "cpu_s": t.user + t.system}, f)
atexit.register(_report)
sys.argv[0] = "cohort"
from cohort.cli.main import main
main()
"""


Sample = tuple[float, float, float, float, float]  # t s, VmRSS, VmHWM, RssShmem MiB, CPU s


@dataclass
class Measured:
    subjects: int
    returncode: int
    wall_s: float
    counts: dict[str, int]
    timings: dict[str, Any]
    driver_peak_mib: float  # VmHWM (the whole run)
    shared_peak_mib: float  # the most object-store pages (RssShmem) in it
    private_peak_mib: float  # the most VmRSS - RssShmem
    private_first_mib: float  # VmRSS - RssShmem when the first part appeared
    private_stream_end_mib: float  # the same at the last sample before the stream ended
    driver_cpu_s: float  # all of the driver's CPU
    stream_cpu_s: float  # the driver's CPU in the streaming window
    stream_rows: int  # subjects that arrived in that window
    files: int
    part_files: int
    folders: int
    most_in_a_folder: int
    out_mib: float
    timeline: list[Sample] = field(repr=False, default_factory=list)

    @property
    def stream_s(self) -> float:
        t = self.timings
        return float(t.get("stream_end_s", 0.0)) - float(t.get("first_result_s", 0.0))

    @property
    def driver_ms_per_subject(self) -> float:
        return 1e3 * self.stream_cpu_s / self.stream_rows if self.stream_rows else float("nan")


# ------------------------------------------------------------------------ phantoms


def _subject(index: int) -> tuple[str, int, int]:
    """(id, cohort index, index in the cohort) of the manifest's ``index``-th row."""
    k, j = index % len(COHORTS), index // len(COHORTS)
    return f"{COHORTS[k]}-{j + 1:05d}", k, j


def _make_chunk(root: str, start: int, stop: int, shape: tuple[int, int, int]) -> int:
    import numpy as np

    from cohort.synthetic import cohort_effect, make_phantom_subject, write_phantom_nifti

    for index in range(start, stop):
        sid, k, j = _subject(index)
        seed = int(np.random.SeedSequence([0, k, j]).generate_state(1)[0])  # as the demo's
        hu, label = make_phantom_subject(shape, SPACING_MM, seed, cohort_effect(k))
        base = Path(root)
        write_phantom_nifti(
            hu,
            label,
            SPACING_MM,
            base / "images" / f"{sid}.nii.gz",
            base / "masks" / f"{sid}.nii.gz",
        )
    (Path(root) / "chunks" / f"{start}.done").touch()
    return stop - start


def make_data(root: Path, sizes: list[int], shape: tuple[int, int, int], workers: int) -> float:
    """Phantoms for the largest size (chunks already done are kept) and a manifest per
    size (a prefix); seconds taken."""
    from cohort.inputs.manifest import Subject, write_manifest

    started = time.perf_counter()
    (root / "chunks").mkdir(parents=True, exist_ok=True)
    stamp = root / "shape.txt"
    if not stamp.exists():
        stamp.write_text(f"{shape}\n")
    if stamp.read_text().strip() != str(shape):
        raise SystemExit(f"{root} holds phantoms of {stamp.read_text().strip()}, not {shape}")
    largest = max(sizes)
    todo = [
        (s, min(s + CHUNK, largest))
        for s in range(0, largest, CHUNK)
        if not (root / "chunks" / f"{s}.done").exists()
    ]
    if todo:
        print(f"generating {sum(b - a for a, b in todo):,} phantoms of {shape} ...", flush=True)
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(_make_chunk, str(root), a, b, shape) for a, b in todo]
            made = 0
            for future in futures:
                made += future.result()
                if made % (10 * CHUNK) == 0:
                    print(f"  {made:,} generated", flush=True)
    subjects = []
    for index in range(largest):
        sid, k, _ = _subject(index)
        image, mask = root / "images" / f"{sid}.nii.gz", root / "masks" / f"{sid}.nii.gz"
        subjects.append(Subject(sid, image, mask, COHORTS[k], None, index + 1))
    for n in sizes:
        write_manifest(subjects[:n], root / f"manifest-{n}.csv")
    return time.perf_counter() - started


# ----------------------------------------------------------------------- measuring


def _proc(pid: int) -> tuple[float, float, float, float] | None:
    """(VmRSS MiB, VmHWM MiB, RssShmem MiB, CPU seconds) of a live process, or None."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    kib = {}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssShmem"):
            kib[name] = float(value.split()[0])
    ticks = stat.rpartition(")")[2].split()  # fields after the command name
    cpu = (int(ticks[11]) + int(ticks[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    if len(kib) < 3:
        return None
    return kib["VmRSS"] / 1024, kib["VmHWM"] / 1024, kib["RssShmem"] / 1024, cpu


class Sampler(threading.Thread):
    """Samples the driver every SAMPLE_S (:data:`Sample`), and notes
    when its first part file appears."""

    def __init__(self, pid: int, parts: Path, started: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.parts, self.started = pid, parts, started
        self.samples: list[Sample] = []
        self.first_part: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.perf_counter() - self.started
            got = _proc(self.pid)
            if got is not None:
                self.samples.append((now, *got))
            if self.first_part is None and self.parts.is_dir():
                self.first_part = now
            self.stop.wait(SAMPLE_S)


def _last_before(samples: list[Sample], t: float) -> Sample:
    before = [s for s in samples if s[0] <= t]
    return before[-1] if before else samples[0]


def _tree(out: Path) -> tuple[int, int, int, int, float]:
    """(files, part files, folders with files, most files in one folder, MiB) under out."""
    files = parts = folders = most = 0
    size = 0
    for folder, _, names in os.walk(out):
        if names:
            folders += 1
            most = max(most, len(names))
        files += len(names)
        if f"{os.sep}.cohort{os.sep}parts" in folder + os.sep:
            parts += sum(n.endswith(".parquet") for n in names)
        size += sum((Path(folder) / n).stat().st_size for n in names)
    return files, parts, folders, most, size / 2**20


def run_one(manifest: Path, out: Path, n: int, options: list[str], python: str) -> Measured:
    if out.exists():
        shutil.rmtree(out)
    report = out.parent / f"{out.name}-driver.json"
    report.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "COHORT_"))}
    env["RAY_AUTH_MODE"] = "token"
    command = [python, "-c", DRIVER, str(report), "run", str(manifest), "--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.Popen([*command, *options], env=env, stdout=subprocess.DEVNULL)
    sampler = Sampler(proc.pid, out / ".cohort" / "parts", started)
    sampler.start()
    returncode = proc.wait()
    wall = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    samples = sampler.samples
    own = json.loads(report.read_text()) if report.is_file() else {}
    run_json = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    timings = run_json.get("timings", {})
    counts = run_json.get("counts", {})
    first = sampler.first_part if sampler.first_part is not None else 0.0
    # the first part is written as the first result arrives: align the driver's clock
    stream_end = (
        first + float(timings.get("stream_end_s", 0)) - float(timings.get("first_result_s", 0))
    )
    none: Sample = (0.0, 0.0, 0.0, 0.0, 0.0)
    at_first = _last_before(samples, first) if samples else none
    at_end = _last_before(samples, stream_end) if samples else none
    fraction = (at_end[0] - at_first[0]) / max(stream_end - first, 1e-9)
    files, parts, folders, most, size = _tree(out)
    return Measured(
        subjects=n,
        returncode=returncode,
        wall_s=wall,
        counts=counts,
        timings=timings,
        driver_peak_mib=max([own.get("vmhwm_kib", 0) / 1024] + [s[2] for s in samples]),
        shared_peak_mib=max((s[3] for s in samples), default=0.0),
        private_peak_mib=max((s[1] - s[3] for s in samples), default=0.0),
        private_first_mib=at_first[1] - at_first[3],
        private_stream_end_mib=at_end[1] - at_end[3],
        driver_cpu_s=float(own.get("cpu_s", samples[-1][4] if samples else 0.0)),
        stream_cpu_s=at_end[4] - at_first[4],
        stream_rows=round(fraction * max(counts.get("done", 0) - 1, 0)),
        files=files,
        part_files=parts,
        folders=folders,
        most_in_a_folder=most,
        out_mib=size,
        timeline=samples,
    )


# ------------------------------------------------------------------------- output


HEADER = (
    "| subjects | wall s | stream s | wall s/subject | driver peak RSS MiB "
    "| object-store pages in it MiB | driver private peak MiB "
    "| private at first → last result MiB | driver CPU s | driver CPU ms/subject "
    "| files (parts) | folders, most files in one |\n"
    "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"
)


def format_row(m: Measured) -> str:
    failed = "" if m.returncode == 0 else f" (exit {m.returncode})"
    return (
        f"| {m.subjects:,}{failed} | {m.wall_s:.0f} | {m.stream_s:.0f} | "
        f"{m.wall_s / m.subjects:.3f} | {m.driver_peak_mib:.0f} | {m.shared_peak_mib:.0f} | "
        f"{m.private_peak_mib:.0f} | {m.private_first_mib:.0f} → {m.private_stream_end_mib:.0f} | "
        f"{m.driver_cpu_s:.0f} | "
        f"{m.driver_ms_per_subject:.1f} | {m.files:,} ({m.part_files:,}) | "
        f"{m.folders}, {m.most_in_a_folder} |"
    )


def summary(rows: list[Measured]) -> tuple[list[str], bool]:
    """Lines under the table (marginal cost, the goal) and whether the goal holds."""
    lines = []
    small, large = min(rows, key=lambda m: m.subjects), max(rows, key=lambda m: m.subjects)
    met = True
    if large.subjects > small.subjects:
        extra = large.subjects - small.subjects
        lines.append(
            f"marginal cost from {small.subjects:,} to {large.subjects:,} subjects: "
            f"{(large.wall_s - small.wall_s) / extra:.3f} s wall, "
            f"{1e3 * (large.driver_cpu_s - small.driver_cpu_s) / extra:.1f} ms driver CPU, "
            f"{1024 * (large.driver_peak_mib - small.driver_peak_mib) / extra:.1f} KiB driver "
            "peak per extra subject"
        )
        ratio = large.driver_peak_mib / small.driver_peak_mib if small.driver_peak_mib else 0.0
        private = large.private_peak_mib / small.private_peak_mib if small.private_peak_mib else 0
        stream = (
            large.private_stream_end_mib / small.private_stream_end_mib
            if small.private_stream_end_mib
            else 0.0
        )
        met = 0 < ratio <= GOAL_RATIO
        lines.append(
            f"goal (driver peak RSS at {large.subjects:,} within 20 % of {small.subjects:,}): "
            f"{ratio:.2f}x, {'met' if met else 'MISSED'}; private peak (without object-store "
            f"pages) {private:.2f}x; private at the end of streaming {stream:.2f}x"
        )
    return lines, met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--subjects", default="500,5000", help="Comma-separated subject counts.")
    parser.add_argument("--shape", type=int, default=64, help="Edge of the cubic volumes.")
    parser.add_argument("--keep", type=Path, help="Keep phantoms and outputs here (reused).")
    parser.add_argument("--options", default=RUN_OPTIONS, help="Options of cohort run.")
    parser.add_argument("--extra", default="", help="More options of cohort run.")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--python", default=sys.executable, help="Interpreter of the driver.")
    parser.add_argument("--json", type=Path, help="Write every figure (and timelines) here.")
    args = parser.parse_args(argv)
    sizes = sorted({int(s) for s in args.subjects.split(",") if s.strip()})
    shape = (args.shape,) * 3
    options = shlex.split(args.options) + shlex.split(args.extra)
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = args.keep or Path(tmp)
        data = root / f"phantoms-{args.shape}"
        setup = make_data(data, sizes, shape, args.workers)
        print(
            f"cohort run, {shape} phantoms ({setup:.0f} s to generate), {os.cpu_count()} CPUs; "
            f"options: {' '.join(options)}",
            flush=True,
        )
        rows = []
        for n in sizes:
            rows.append(run_one(data / f"manifest-{n}.csv", root / f"run-{n}", n, options,
                                args.python))  # fmt: skip
            print(f"{n:,} subjects: {format_row(rows[-1])}", flush=True)
    print()
    print(HEADER)
    for row in rows:
        print(format_row(row))
    lines, met = summary(rows)
    print()
    for line in lines:
        print(line)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    failed = any(r.returncode != 0 for r in rows)
    return 1 if failed or not met else 0


if __name__ == "__main__":
    sys.exit(main())
