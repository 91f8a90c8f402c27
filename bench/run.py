"""``make bench``: cohort against the plain approach and the machine's limits.

Sections, all in one process run (so every ratio compares figures of one run):

1. ceiling   fp32 ``torch.mm`` rate of this machine (GFLOP/s)
2. forward   one 1x1xDxHxW forward: 1- vs 3-channel stem, stop after the last
             hook or not, depth-factorised or plain 3D layers; seconds and GFLOP
             (torch's flop counter: the FLOPs each variant executes)
3. baseline  the plain loop of the origin protocol (``bench/baseline.py``)
4. model     cohort's core functions in a loop on pre-loaded tensors, plus the
             optimisation candidates of ``bench/core.py``
5. pipeline  ``cohort run`` in both pooling modes, each in its own process, with
             its default executor (in-process for a cohort of at most 64
             subjects, else a local Ray started inside the clock);
             ``--warm-modes`` again on a Ray started before it (a running
             cluster: Ray Data); masked-input cosines checked against the baseline
6. memory    driver peak RSS of ``cohort run`` for a small and a large cohort

Writes ``bench/results/bench-<time>.json`` and ``.txt`` (and ``latest.*``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bench import core
from bench.baseline import run_baseline
from bench.measure import count_gflop, matmul_gflops, peak_rss_mib, time_calls

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
AGREEMENT = 1e-4  # cosines of cohort's masked-input vs the baseline


@dataclass
class Row:
    """One line of the table."""

    name: str
    subjects: int
    seconds: float
    gflop_per_subject: float = math.nan
    driver_mib: float = math.nan
    actor_mib: float = math.nan
    note: str = ""
    per_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.per_s = self.subjects / self.seconds if self.seconds > 0 else math.nan


def _shape(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",")]
    if len(parts) != 3 or min(parts) < 16:
        raise argparse.ArgumentTypeError(f"shape must be D,H,W >= 16, got {text!r}")
    return parts[0], parts[1], parts[2]


def _ints(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--subjects", type=int, default=4, help="cohort size (default 4)")
    p.add_argument("--shape", type=_shape, default=(96, 128, 128), help="D,H,W voxels")
    p.add_argument(
        "--baseline-subjects",
        type=int,
        default=None,
        help="run the plain loop on the first N subjects only (default: all)",
    )
    p.add_argument(
        "--variants",
        default=",".join(core.VARIANTS),
        help=f"model-only variants to time, of: {', '.join(core.VARIANTS)}",
    )
    p.add_argument("--modes", default="masked-input,masked-pool", help="pipeline pooling modes")
    p.add_argument(
        "--warm-modes",
        default="masked-pool",
        help="modes also run on a Ray instance started before the clock (a running cluster)",
    )
    p.add_argument("--repeats", type=int, default=2, help="repeats of the single forward")
    p.add_argument("--rounds", type=int, default=3, help="rounds of interleaved forwards")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    p.add_argument("--memory-sizes", type=_ints, default=[20, 200], help="cohorts, e.g. 20,200")
    p.add_argument("--memory-shape", type=_shape, default=(32, 64, 64))
    p.add_argument("--weights", default="random", choices=["random", "imagenet"])
    p.add_argument(
        "--skip",
        default="",
        help="sections to skip: forward,interleaved,baseline,model,pipeline,memory",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def phantom_cohort(out: Path, n: int, shape: tuple[int, int, int]) -> Path:
    """A phantom cohort of ``n`` subjects (two cohorts), made once and reused."""
    from cohort.synthetic import make_phantom_cohort

    folder = out / "data" / f"{'x'.join(map(str, shape))}-n{n}"
    manifest = folder / "cohort.csv"
    if not manifest.is_file():
        made = make_phantom_cohort(folder, n_per_cohort=(n + 1) // 2, shape=shape, seed=0)
        frame = pd.read_csv(made)
        frame.head(n).to_csv(manifest, index=False)
    return manifest


def weights_state(name: str) -> dict[str, torch.Tensor]:
    from cohort.config import ModelConfig
    from cohort.model.network import load_weights

    return load_weights(ModelConfig(weights=name), download=False).state_dict


# (gray stem, stop after the last hook, depth-factorised): cohort's default first
FORWARDS = [
    (True, True, True),
    (True, True, False),
    (True, False, False),
    (False, True, False),
    (False, False, False),
]


def section_forward(
    args: argparse.Namespace, state: dict[str, torch.Tensor]
) -> list[dict[str, Any]]:
    """One forward with/without the gray stem, the early stop and the depth factorisation."""
    rows = []
    for gray, stop, factorised in FORWARDS:
        ex = core.extractor(state, gray_stem=gray, stop_early=stop, factorised=factorised)
        x = torch.randn(1, 1 if gray else 3, *args.shape)

        def forward(ex: core.FeatureExtractor = ex, x: torch.Tensor = x) -> object:
            with torch.inference_mode():
                return ex(x)

        gflop = count_gflop(forward)  # also the warm-up
        t = time_calls(forward, args.repeats, warmup=1)
        rows.append(
            {
                "stem": "1-channel" if gray else "3-channel",
                "stop_after_last_hook": stop,
                "factorised": factorised,
                "gflop": gflop,
                "best_s": t.best,
                "median_s": t.median,
                "worst_s": t.worst,
                "spread": t.spread,
            }
        )
        log(
            f"forward stem={rows[-1]['stem']} stop={stop} factorised={factorised}: "
            f"{t.best:.2f} s, {gflop:.1f} GFLOP"
        )
    return rows


def run_probe(
    manifest: Path, mode: str, work: Path, weights: str, extra: list[str] | None = None
) -> dict[str, Any]:
    """``cohort run`` in its own process (``bench/probe.py``); its JSON report."""
    out = work / f"run-{mode}-{time.monotonic_ns()}"
    report = out.with_suffix(".json")
    command = [
        sys.executable, "-m", "bench.probe", str(manifest), str(out),
        "--pooling", mode, "--weights", weights, "--json", str(report), *(extra or []),
    ]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    subprocess.run(command, check=True, cwd=ROOT, env=env)
    data: dict[str, Any] = json.loads(report.read_text())
    data["out"] = str(out)
    return data


def cosine_gap(out: Path, baseline: dict[str, dict[tuple[str, str, str], float]]) -> float:
    """Largest |cosine(cohort) - cosine(baseline)| over the baseline's subjects."""
    frame = pd.read_parquet(out / "similarity.parquet")
    gap = 0.0
    for sid, cosines in baseline.items():
        rows = frame[frame.subject_id == sid]
        if len(rows) != len(cosines):
            raise RuntimeError(
                f"subject {sid}: cohort has {len(rows)} cosines, baseline {len(cosines)}"
            )
        for row in rows.itertuples():
            key = (str(row.layer), str(row.region_a), str(row.region_b))
            gap = max(gap, abs(float(row.cosine) - cosines[key]))  # type: ignore[arg-type]
    return gap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    skip = set(args.skip.split(",")) - {""}
    started = time.perf_counter()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    args.out.mkdir(parents=True, exist_ok=True)
    state = weights_state(args.weights)
    result: dict[str, Any] = {
        "config": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "out"
        },
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": threads,
            "load_average_start": os.getloadavg(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
    }
    ceiling = matmul_gflops()
    result["ceiling_gflops"] = asdict(ceiling)
    log(f"fp32 mm ceiling {ceiling.best:.1f} GFLOP/s (median {ceiling.median:.1f})")

    if "interleaved" not in skip and args.rounds > 0:
        log(f"interleaved forwards, {args.rounds} rounds")
        spread = core.interleaved(state, args.shape, args.rounds)
        result["interleaved"] = {
            name: {"median_s": float(np.median(v)), "min_s": min(v), "max_s": max(v), "all": v}
            for name, v in spread.items()
        }

    forward = [] if "forward" in skip else section_forward(args, state)
    result["forward"] = forward
    by = {(f["stem"], f["stop_after_last_hook"], f["factorised"]): f for f in forward}
    gf1 = by.get(("1-channel", True, True), {}).get("gflop", math.nan)  # cohort's forward
    gf1_plain = by.get(("1-channel", True, False), {}).get("gflop", math.nan)
    gf3 = by.get(("3-channel", False, False), {}).get("gflop", math.nan)  # the baseline's

    manifest = phantom_cohort(args.out, args.subjects, args.shape)
    loaded, load_times = core.load_all(manifest, core.PreprocessConfig())
    regions = len(loaded[0].names)
    result["load"] = asdict(load_times) | {"subjects": len(loaded)}
    rows: list[Row] = []
    checks: dict[str, Any] = {}

    baseline_cos: dict[str, dict[tuple[str, str, str], float]] = {}
    if "baseline" not in skip:
        subjects = pd.read_csv(manifest).head(args.baseline_subjects or args.subjects)
        triples = [
            (str(r.subject_id), manifest.parent / str(r.image), manifest.parent / str(r.mask))
            for r in subjects.itertuples()
        ]
        log(f"baseline: plain loop on {len(triples)} subjects")
        base = run_baseline(triples, weights=args.weights)
        baseline_cos = base.cosines
        rows.append(Row("baseline (plain loop)", len(triples), base.seconds, regions * gf3,
                        note="3-ch stem, whole trunk, 1 forward/region"))  # fmt: skip

    if "model" not in skip:
        reference: dict[str, list[list[core.RegionVector]]] = {}
        for variant in [v for v in args.variants.split(",") if v]:
            ex = core.extractor(
                state,
                channels_last=variant.endswith("cl3d"),
                factorised=not variant.endswith("plain3d"),
            )
            log(f"model-only {variant} on {len(loaded)} subjects")
            seconds, vectors = core.run_variant(variant, ex, loaded)
            family = variant.split("/")[0]
            note = core.VARIANTS[variant]
            if family in reference:
                diff = core.max_difference(reference[family], vectors)
                checks[f"{variant} vs {family}"] = diff
                note += f"; max rel diff {diff:.1e}"
            else:
                reference[family] = vectors
            forwards = regions if family == "masked-input" else 1
            gflop = gf1_plain if variant.endswith("plain3d") else gf1
            rows.append(Row(f"model {variant}", len(loaded), seconds, forwards * gflop, note=note))

    work = Path(tempfile.mkdtemp(prefix="cohort-bench-"))
    if "pipeline" not in skip:
        runs = [(mode, False) for mode in args.modes.split(",") if mode]
        runs += [(mode, True) for mode in args.warm_modes.split(",") if mode]
        for mode, warm in runs:
            label = f"pipeline {mode}" + (" (Ray up)" if warm else "")
            log(f"{label}: cohort run --pooling {mode} on {args.subjects} subjects")
            probe = run_probe(manifest, mode, work, args.weights, ["--warm"] if warm else None)
            forwards = regions if mode == "masked-input" else 1
            note = f"first result {probe['first_s']:.1f} s"
            if probe["steady_per_s"]:
                note += f"; steady {probe['steady_per_s']:.3f}/s"
            if mode == "masked-input" and baseline_cos:
                gap = cosine_gap(Path(probe["out"]), baseline_cos)
                checks[f"{label} cosines vs baseline (max abs)"] = gap
                note += f"; cos gap {gap:.1e}"
            rows.append(
                Row(label, probe["done"], probe["wall_s"], forwards * gf1,
                    probe["driver_peak_mib"], probe["actor_peak_mib"], note)
            )  # fmt: skip
            result.setdefault("probes", []).append(probe | {"label": label})

    if "memory" not in skip:
        for n in args.memory_sizes:
            small = phantom_cohort(args.out, n, args.memory_shape)
            log(f"memory: cohort run masked-pool on {n} subjects of {args.memory_shape}")
            probe = run_probe(small, "masked-pool", work, args.weights)
            rows.append(
                Row(f"memory n={n} {'x'.join(map(str, args.memory_shape))}", probe["done"],
                    probe["wall_s"], math.nan, probe["driver_peak_mib"], probe["actor_peak_mib"],
                    "pipeline masked-pool")
            )  # fmt: skip
            result.setdefault("memory", []).append(probe)

    result["rows"] = [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(r).items()}
        for r in rows
    ]  # null, not NaN, so that strict JSON readers take the file
    result["checks"] = checks
    result["summary"] = summarise(rows, result.get("probes", []))
    result["seconds"] = time.perf_counter() - started
    result["bench_driver_peak_mib"] = peak_rss_mib()
    result["machine"]["load_average_end"] = os.getloadavg()
    text = render(result, rows, ceiling.best)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (f"bench-{stamp}", "latest"):
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2, default=_plain))
        (args.out / f"{name}.txt").write_text(text)
    print(text)
    return result


def _plain(value: object) -> object:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


def summarise(rows: list[Row], probes: list[dict[str, Any]]) -> dict[str, float]:
    """Ratios the issue's targets are stated in."""
    by = {r.name: r for r in rows}
    out: dict[str, float] = {}
    base = by.get("baseline (plain loop)")
    for r in rows:
        if base and not r.name.startswith("memory"):
            out[f"{r.name} / baseline"] = r.per_s / base.per_s
    steady = {p["label"]: p["steady_per_s"] for p in probes if p.get("steady_per_s")}
    for r in rows:
        if not r.name.startswith("pipeline "):
            continue
        mode = r.name.split()[1]
        model = by.get(f"model {mode}")
        if model:
            out[f"{r.name} / model, whole run"] = r.per_s / model.per_s
            if r.name in steady:
                out[f"{r.name} / model, steady state"] = steady[r.name] / model.per_s
    memory = [r for r in rows if r.name.startswith("memory")]
    if len(memory) >= 2:
        out["driver peak growth (largest/smallest cohort)"] = (
            memory[-1].driver_mib / memory[0].driver_mib
        )
    return out


def render(result: dict[str, Any], rows: list[Row], ceiling: float) -> str:
    base = next((r for r in rows if r.name == "baseline (plain loop)"), None)
    lines = [
        f"cohort bench  {time.strftime('%Y-%m-%d %H:%M')}  {result['machine']['cpus']} CPUs, "
        f"torch threads {result['machine']['torch_threads']}, load avg "
        f"{result['machine']['load_average_start'][0]:.1f} -> "
        f"{result['machine']['load_average_end'][0]:.1f}",
        f"fp32 matmul ceiling: {ceiling:.1f} GFLOP/s (best of 5 torch.mm 2048^2)",
        f"cohort: {result['config']['subjects']} subjects of "
        f"{'x'.join(map(str, result['config']['shape']))}; weights {result['config']['weights']}",
        "",
    ]
    if result["forward"]:
        lines.append("single forward 1x1xDxHxW                   GFLOP   best s  median s  spread")
        for f in result["forward"]:
            stop = "stop at last hook" if f["stop_after_last_hook"] else "whole trunk"
            label = f"{f['stem']}, {stop}, {'factorised' if f['factorised'] else 'plain 3D'}"
            lines.append(
                f"  {label:<42} {f['gflop']:6.1f} {f['best_s']:8.2f} {f['median_s']:9.2f} "
                f"{f['spread']:7.0%}"
            )
        lines.append("")
    if result.get("interleaved"):
        lines.append("interleaved forwards, s per volume           median     min     max")
        for name, v in result["interleaved"].items():
            lines.append(f"  {name:<38} {v['median_s']:6.2f} {v['min_s']:7.2f} {v['max_s']:7.2f}")
        lines.append("")
    head = (
        f"{'stage':<34} {'n':>4} {'s':>8} {'subj/s':>8} {'x base':>7} {'GFLOP/s':>8} "
        f"{'ceil':>5} {'driver':>7} {'actor':>7}  note"
    )
    lines += [head, "-" * len(head)]
    for r in rows:
        gflops = r.gflop_per_subject * r.per_s
        ratio = r.per_s / base.per_s if base and not r.name.startswith("memory") else math.nan
        lines.append(
            f"{r.name:<34} {r.subjects:>4} {r.seconds:8.1f} {r.per_s:8.3f} {_f(ratio, 7, 2)} "
            f"{_f(gflops, 8, 1)} {_f(gflops / ceiling * 100, 4, 0)}% {_f(r.driver_mib, 7, 0)} "
            f"{_f(r.actor_mib, 7, 0)}  {r.note}"
        )
    load = result["load"]
    n = max(1, load["subjects"])
    lines += [
        "",
        f"per subject ({load['voxels']:,} voxels): decode {load['decode_s'] / n:.3f} s, "
        f"check {load['check_s'] / n:.3f} s, preprocess {load['preprocess_s'] / n:.3f} s",
        "peak memory in MiB (RSS high-water mark); driver = the cohort run process",
        "GFLOP/s counts the FLOPs a stage executes: factorised layers execute fewer for the "
        "same values",
    ]
    for key, value in {**result["checks"], **result["summary"]}.items():
        lines.append(f"  {key}: {value:.4g}")
    lines.append(f"bench wall time {result['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def _f(value: float, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if math.isnan(value) else f"{value:{width}.{digits}f}"


if __name__ == "__main__":
    main()
