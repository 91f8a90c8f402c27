"""The GPU check: one script, one table, under 8 minutes on one lent GPU.

Run it with ``bash bench/gpu_check.sh`` on the lent machine (it calls this
module). Without CUDA it stops at once, saying so (exit 2), unless it is asked
for a dry run on the CPU (``--device cpu``, used by the tests with tiny shapes).

What it measures, on seeded random DenseNet121 weights with the default layers:

1. model only: one forward pass + masked pooling at each ``--shapes`` entry
   (default 96x128x128 and the origin study's 512x512x216), fp32 and bf16
   autocast, depth-factorised and plain 3D convolutions; best of ``--repeats``
   seconds, and the peak GPU memory of the pass per input voxel (the allocator's
   ``max_memory_allocated``), for the lean pass and the plain forward;
2. end to end: ``cohort run`` on ``--subjects`` links to one full-size phantom
   (default 40 of 512x512x216), once as ``.nii.gz`` and once as uncompressed
   ``.nii``, with the machine's CPUs as loaders, sampling the GPU's utilisation
   (nvidia-smi) the whole time: subjects per second, the fraction of the run's
   time the GPU spent computing (the rest it waited for input), and the actor's
   time per subject beside the forward pass (its mean time less part 1's fp32
   lean pass at that shape). Needs ray, nibabel and isal (not on the lent
   machine by default: ../shared/GPU.md says how to carry their wheels); without
   ray this part is reported as skipped, and the model-only part still stands;
3. ``bench/feed.py`` on ``--feed-subjects`` of the same phantom: the data path
   alone (pass-through network) against ``loader cores / t_loader``; on Ray when
   it is importable, else in-process (loader threads).

The table goes to stdout and, with the raw numbers, to ``$OUT/gpu_check.json``
(or ``bench/results``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = (
    "gpu_check: no CUDA device here (torch {torch} sees none); this check measures a GPU. "
    "Run `bash bench/gpu_check.sh` on the lent GPU machine, or pass --device cpu for a "
    "dry run of the script itself"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--shapes", default="96,128,128;512,512,216", help="D,H,W;D,H,W")
    p.add_argument("--subjects", type=int, default=40, help="end-to-end subjects")
    p.add_argument("--full-shape", default="512,512,216", help="end-to-end subject D,H,W")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--feed-subjects", type=int, default=24, help="bench/feed.py subjects")
    p.add_argument("--no-pipeline", action="store_true", help="model-only part only")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench/results")))
    return p.parse_args(argv)


def shape_of(text: str) -> tuple[int, int, int]:
    d, h, w = (int(x) for x in text.split(","))
    return d, h, w


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_only(
    device: torch.device, shapes: list[tuple[int, int, int]], repeats: int
) -> list[dict[str, Any]]:
    """Seconds and peak memory per voxel of forward + masked pooling, per variant."""
    from cohort.config import ModelConfig, PoolingConfig
    from cohort.model.hooks import FeatureExtractor, resolve_layers
    from cohort.model.network import build_network, random_weights
    from cohort.model.pooling import extract

    state = random_weights("densenet121", 0).state_dict
    precisions = ("fp32", "bf16") if device.type == "cuda" else ("fp32",)
    rows: list[dict[str, Any]] = []
    for factorised in (True, False):
        network, _ = build_network("densenet121", state, factorised=factorised)
        network = network.to(device)
        layers = resolve_layers(network, ModelConfig().layers)
        for shape in shapes:
            gen = torch.Generator().manual_seed(0)
            image = torch.randn(shape, generator=gen).to(device)
            index = torch.zeros(shape, dtype=torch.uint8)
            index[: shape[0] // 2] = 1
            index[:, : shape[1] // 3] = 2
            index = index.to(device)
            for lean in (True, False):
                if not factorised and lean is False and shape[1] >= 512 and device.type == "cpu":
                    continue  # the plain, unfactorised full-size pass: minutes on a CPU
                extractor = FeatureExtractor(network, layers, lean=lean)
                for precision in precisions:

                    def step(
                        extractor: FeatureExtractor = extractor,
                        precision: str = precision,
                        image: torch.Tensor = image,
                        index: torch.Tensor = index,
                    ) -> None:
                        with torch.autocast(
                            device.type, dtype=torch.bfloat16, enabled=precision == "bf16"
                        ):
                            extract(
                                extractor,
                                image,
                                index,
                                ("a", "b", "background"),
                                PoolingConfig(),
                                -1.0,
                            )

                    step()  # warm-up: cuDNN picks its kernels for this shape
                    synchronise(device)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                        base = torch.cuda.memory_allocated(device)
                    times = []
                    for _ in range(repeats):
                        started = time.perf_counter()
                        step()
                        synchronise(device)
                        times.append(time.perf_counter() - started)
                    peak = (
                        (torch.cuda.max_memory_allocated(device) - base) / math.prod(shape)
                        if device.type == "cuda"
                        else math.nan
                    )
                    rows.append(
                        {
                            "shape": "x".join(map(str, shape)),
                            "factorised": factorised,
                            "lean": lean,
                            "precision": precision,
                            "best_s": min(times),
                            "median_s": statistics.median(times),
                            "peak_bytes_per_voxel": peak,
                        }
                    )
                    print(_row_text(rows[-1]), flush=True)
        del network
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _row_text(row: dict[str, Any]) -> str:
    kind = ("factorised" if row["factorised"] else "plain 3D") + (
        ", lean" if row["lean"] else ", plain pass"
    )
    return (
        f"{row['shape']:>12} {kind:<24} {row['precision']:>5} {row['best_s']:9.4f} "
        f"{row['median_s']:9.4f} {row['peak_bytes_per_voxel']:9.1f}"
    )


class UtilisationSampler:
    """nvidia-smi's utilization.gpu every 200 ms, in a thread, while a run goes on."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> UtilisationSampler:
        try:
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "200",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
        except OSError:
            return self  # no nvidia-smi (the CPU dry run): no samples
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.strip().split(",")[0]) / 100.0)
            except ValueError:
                continue

    def __exit__(self, *_: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)

    @property
    def busy(self) -> float:
        return statistics.fmean(self.samples) if self.samples else math.nan


def make_subjects(shape: tuple[int, int, int]) -> Path:
    """One full-size phantom pair (``ct.nii.gz``, ``seg.nii.gz``) and the image
    uncompressed (``ct.nii``: the same bytes without gzip) in a new folder."""
    from isal import igzip

    from bench.loader import make_full_size

    folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    image, _ = make_full_size(folder, shape)
    (folder / "ct.nii").write_bytes(igzip.decompress(image.read_bytes()))
    return folder


def end_to_end(
    device: torch.device, folder: Path, subjects: int, suffix: str, forward_s: float
) -> dict[str, Any]:
    """``cohort run`` on ``subjects`` links to one phantom stored as ``suffix`` (``.nii.gz``
    or ``.nii``); subjects/s, the GPU's busy fraction, and the actor's time per subject
    beyond the forward pass (``forward_s``, the model-only figure of that shape)."""
    missing = [m for m in ("ray", "nibabel") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"{', '.join(missing)} not importable here (see ../shared/GPU.md)"}
    import shutil

    from cohort.inputs.manifest import Subject, write_manifest

    work = folder / f"run{suffix}"
    work.mkdir()
    rows = []
    for i in range(subjects):  # links: each subject's files are read as the loaders read any
        copy_image, copy_mask = work / f"s{i:03d}{suffix}", work / f"s{i:03d}-mask.nii.gz"
        copy_image.symlink_to(folder / f"ct{suffix}")
        copy_mask.symlink_to(folder / "seg.nii.gz")
        rows.append(Subject(f"s{i:03d}", copy_image, copy_mask, "all", None, i + 1))
    manifest = write_manifest(rows, work / "manifest.csv")
    out = work / "out"
    command = [
        sys.executable, "-m", "cohort", "run", str(manifest), "--out", str(out),
        "--weights", "random", "--device", device.type, "--loader-cpus", "1",
        "--actor-cpus", "0.5", "--bootstrap", "0", "--permutations", "0",
        "--no-report", "--quiet", "--stall-timeout", "300",
        "--executor", "ray",  # the feature actor fed by the machine's CPUs as loaders
    ]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    with UtilisationSampler() as sampler:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    result: dict[str, Any] = {"exit": done.returncode, "wall_s": wall, "gpu_busy": sampler.busy}
    result["format"] = suffix
    if done.returncode != 0:
        result["error"] = (done.stdout + done.stderr)[-2000:]
        return result
    run = json.loads((out / "run.json").read_text())
    extract_s = float(run["timings"]["extract_mean_s"] or math.nan)
    result.update(
        subjects=run["counts"]["done"],
        subjects_per_s=run["counts"]["done"] / wall,
        extract_mean_s=extract_s,
        # the actor's own compute time over the run's time: the rest it waited for input
        actor_busy=extract_s * run["counts"]["done"] / wall,
        # what the actor spends per subject beside the forward pass: taking the row,
        # copying to the device, the window, pooling, the ledger
        actor_non_compute_s=extract_s - forward_s,
        actor_non_compute_share=(extract_s - forward_s) / forward_s,
    )
    shutil.rmtree(work, ignore_errors=True)
    return result


def feed_figures(device: torch.device, folder: Path, subjects: int, out: Path) -> dict[str, Any]:
    """``bench/feed.py`` (the data path with a pass-through network) on this machine's
    CPUs; on Ray when it is importable, else in-process."""
    from bench import feed

    argv = ["--data", str(folder), "--subjects", str(subjects), "--device", device.type]
    argv += ["--out", str(out / "feed")]
    if importlib.util.find_spec("ray") is None:
        argv.append("--in-process")
    try:
        feed.main(argv)
    except SystemExit as exc:  # a failed stream: say so, keep the rest of the check
        return {"error": str(exc)}
    figures: dict[str, Any] = json.loads((out / "feed" / "feed.json").read_text())
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA.format(torch=torch.__version__), file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    report: dict[str, Any] = {"device": name, "torch": torch.__version__}
    started = time.perf_counter()
    shapes = [shape_of(s) for s in args.shapes.split(";")]
    print(f"{name}, torch {torch.__version__}")
    print(f"{'shape':>12} {'variant':<24} {'prec':>5} {'best s':>9} {'median s':>9} {'B/voxel':>9}")
    report["model"] = model_only(device, shapes, args.repeats)
    full = "x".join(map(str, shape_of(args.full_shape)))
    forwards = [
        r["best_s"]
        for r in report["model"]
        if r["shape"] == full and r["factorised"] and r["lean"] and r["precision"] == "fp32"
    ]
    forward_s = forwards[0] if forwards else math.nan
    args.out.mkdir(parents=True, exist_ok=True)
    pipes: list[dict[str, Any]] = []
    if args.no_pipeline:
        pipes.append({"skipped": "--no-pipeline"})
    elif missing := [m for m in ("nibabel", "isal") if importlib.util.find_spec(m) is None]:
        pipes.append({"skipped": f"{', '.join(missing)} not importable (see ../shared/GPU.md)"})
    else:
        folder = make_subjects(shape_of(args.full_shape))
        for suffix in (".nii.gz", ".nii"):
            pipes.append(end_to_end(device, folder, args.subjects, suffix, forward_s))
            _print_pipe(pipes[-1], args.full_shape)
        report["feed"] = feed_figures(device, folder, args.feed_subjects, args.out)
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    report["pipeline"] = pipes
    report["total_s"] = time.perf_counter() - started
    if "skipped" in pipes[0]:
        print(f"end to end: skipped ({pipes[0]['skipped']})")
    print(f"total {report['total_s']:.0f} s")
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    return 0 if all("error" not in p for p in pipes) else 1


def _print_pipe(pipe: dict[str, Any], shape: str) -> None:
    if pipe.get("exit", 0) != 0:
        print(f"end to end ({pipe['format']}): cohort run exited {pipe['exit']}:\n{pipe['error']}")
        return
    print(
        f"end to end ({pipe['format']}): {pipe['subjects']} subjects of {shape} in "
        f"{pipe['wall_s']:.1f} s = {pipe['subjects_per_s']:.2f}/s; the actor computed "
        f"{pipe['actor_busy']:.0%} of the time, the GPU was busy {pipe['gpu_busy']:.0%} "
        f"(nvidia-smi samples); actor time beside the forward pass "
        f"{pipe['actor_non_compute_s']:.3f} s a subject ({pipe['actor_non_compute_share']:.0%} "
        "of the pass)",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
