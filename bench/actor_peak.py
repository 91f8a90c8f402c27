"""The feature actor's peak unique memory in real runs, against what it asks Ray for.

    python -m bench.actor_peak --shape 64,64,64 --shape 96,128,128 --shape 192,256,256

For each shape, a phantom cohort and ``cohort run`` as its own process
(masked-pool, seeded random weights) while the feature actor's unique memory
(private pages) is sampled every 0.2 s. Prints the peak; the estimate the
actor's request is sized from (the largest input's ``Estimate.host`` plus
``WORKER_BASE_BYTES``, for the run's hooked layers); their
ratio; and whether Ray Data's end-of-run check warns (it asks for 1.25 x the
actor's peak unique memory and warns when that is above the request).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench import timed
from bench.measure import ProcessPeak
from bench.run import phantom_cohort
from cohort.config import PreprocessConfig
from cohort.inputs.headers import scan_sizes
from cohort.inputs.manifest import read_manifest
from cohort.model.memory import WORKER_BASE_BYTES, estimate_peak_bytes

RAY_DATA_HEADROOM = 1.25  # ray.data's high-memory detector: recommended = 1.25 x peak


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", help="D,H,W (repeatable)")
    p.add_argument("--subjects", type=int, default=4)
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args(argv)
    shapes = args.shape or ["64,64,64", "96,128,128", "192,256,256"]
    folder = Path(tempfile.mkdtemp(prefix="actor-peak-"))
    print("| shape | run | peak unique | estimate | peak / estimate | request | Ray Data warns |")
    print("|---|---|---:|---:|---:|---:|---|")
    for text in shapes:
        d, h, w = (int(x) for x in text.split(","))
        manifest = phantom_cohort(folder / text.replace(",", "x"), args.subjects, (d, h, w))
        # the model input, as the driver's header scan sizes it
        images = [subject.image for subject in read_manifest(manifest)]
        (shape,) = scan_sizes(images, PreprocessConfig()).largest
        for r in range(args.runs):
            out = folder / f"{text.replace(',', 'x')}-{r}"
            command = [sys.executable, "-m", "cohort", "run", str(manifest), "--out", str(out)]
            command += ["--weights", "random", "--quiet", "--no-report"]
            command += ["--executor", "ray"]  # the feature actor is what it measures
            with ProcessPeak("FeatureActor", 0.2, unique=True) as actor:
                timed(command)
            run = json.loads((out / "run.json").read_text())
            request = run["resources"]["actor_memory_gb"] * 1024  # MiB
            layers = [layer["module_path"] for layer in run["layers"]]
            host = estimate_peak_bytes(shape, "densenet121", layers).host
            estimate = (host + WORKER_BASE_BYTES) / 2**20
            warns = RAY_DATA_HEADROOM * actor.peak_mib > request
            print(
                f"| {text.replace(',', 'x')} | {r + 1} | {actor.peak_mib:,.0f} MiB "
                f"| {estimate:,.0f} MiB | {actor.peak_mib / estimate:.2f} "
                f"| {request:,.0f} MiB | {'yes' if warns else 'no'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
