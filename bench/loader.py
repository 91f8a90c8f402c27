"""t_loader: one full-size subject through the loader task, stage by stage.

::

    python -m bench.loader --make /tmp/feed-data          # once: a 512x512x216 knee pair
    python -m bench.loader --data /tmp/feed-data --repeats 3

Times, in one process, the loader task (:func:`cohort.execution.load.load_subject`)
on one ``.nii.gz`` pair and its parts: reading the files, hashing, decoding the
gzip stream (zlib, which nibabel uses, against the fast decoders that are
installed), the stages (load, check, preprocess) and the hand-over (what the
task returns, made ready for the object store). Best and median of
``--repeats``; CPU seconds of the process beside the wall time.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import importlib
import json
import pickle
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FULL_SHAPE = (216, 512, 512)  # (D, H, W): the origin study's knee CT
FULL_SPACING = (0.6, 0.35, 0.35)


def make_full_size(out: Path, shape: tuple[int, int, int] = FULL_SHAPE) -> tuple[Path, Path]:
    """One phantom knee pair (int16 HU, uint8 labels) as ``.nii.gz`` under ``out``."""
    from cohort.synthetic import make_phantom_subject, write_phantom_nifti

    image, mask = out / "ct.nii.gz", out / "seg.nii.gz"
    if not (image.exists() and mask.exists()):
        hu, label = make_phantom_subject(shape, FULL_SPACING, seed=0)
        write_phantom_nifti(hu, label, FULL_SPACING, image, mask)
    return image, mask


def timed(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Best and median wall and CPU seconds of ``fn`` over ``repeats`` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return {
        "wall_min": min(walls),
        "wall_median": statistics.median(walls),
        "cpu_min": min(cpus),
        "cpu_median": statistics.median(cpus),
    }


def decoders() -> dict[str, Callable[[bytes], bytes]]:
    """gzip decoders to compare: zlib's (the standard library) and any fast one installed."""
    found: dict[str, Callable[[bytes], bytes]] = {"zlib (gzip)": gzip.decompress}
    for label, module, attr in (
        ("isal (igzip)", "isal.igzip", "decompress"),
        ("zlib-ng (gzip_ng)", "zlib_ng.gzip_ng", "decompress"),
        ("libdeflate (deflate)", "deflate", "gzip_decompress"),
    ):
        try:
            found[label] = getattr(importlib.import_module(module), attr)
        except ImportError:
            continue
    return found


def measure(image: Path, mask: Path, repeats: int) -> dict[str, Any]:
    """The loader task and its parts on one pair; see the module docstring."""
    import nibabel as nib

    from cohort.config import RunConfig, parse_label_map
    from cohort.execution.load import load_subject
    from cohort.inputs.handover import handed_bytes, to_columns
    from cohort.inputs.stages import Stages

    cfg = RunConfig()
    row = {"subject_id": "s0", "image": str(image), "mask": str(mask), "labels": "tibia=1,femur=2"}
    out: dict[str, Any] = {"image": str(image), "bytes_on_disk": image.stat().st_size}
    raw = image.read_bytes()
    decoded = gzip.decompress(raw)
    out["bytes_decoded"] = len(decoded)
    reference = np.asarray(nib.load(image).dataobj)  # type: ignore[attr-defined]
    parts: dict[str, dict[str, float]] = {}
    parts["read image + mask (bytes)"] = timed(
        lambda: (image.read_bytes(), mask.read_bytes()), repeats
    )
    parts["sha256 image + mask (in memory)"] = timed(
        lambda: (hashlib.sha256(raw).hexdigest(), hashlib.sha256(mask.read_bytes())), repeats
    )
    for label, decode in decoders().items():
        if decode(raw) != decoded:
            raise SystemExit(f"{label} decoded other bytes than zlib")
        parts[f"gzip decode, image: {label}"] = timed(functools.partial(decode, raw), repeats)
    parts["nibabel: np.asarray(dataobj), image"] = timed(
        lambda: np.asarray(nib.load(image).dataobj),  # type: ignore[attr-defined]
        repeats,
    )
    parts["nibabel: get_fdata(float32), image"] = timed(
        lambda: nib.load(image).get_fdata(dtype=np.float32),  # type: ignore[attr-defined]
        repeats,
    )
    stages = Stages(parse_label_map(row["labels"]), cfg.preprocess)
    contents = {image: raw, mask: mask.read_bytes()}
    pair = stages.loaded(image, mask, contents=contents)
    parts["stage load, from the bytes (image + mask)"] = timed(
        lambda: stages.loaded(image, mask, contents=contents), repeats
    )
    parts["stage load, from the files by nibabel (image + mask)"] = timed(
        lambda: stages.loaded(image, mask), repeats
    )
    checked = stages.check(pair)
    parts["stage check"] = timed(lambda: stages.check(pair), repeats)
    placed = stages.place(checked, cfg.regions.background)
    parts["stage preprocess: placed, HU (handed over)"] = timed(
        lambda: stages.place(checked, cfg.regions.background), repeats
    )
    prepared = stages.preprocess(checked, cfg.regions.background)
    parts["stage preprocess: float32 model input (numpy, before)"] = timed(
        lambda: stages.preprocess(checked, cfg.regions.background), repeats
    )
    parts["hand-over columns (to_columns)"] = timed(lambda: to_columns(placed), repeats)
    parts["before: pickle.dumps of the float32 subject"] = timed(
        lambda: pickle.dumps(prepared, 5), repeats
    )
    out["handover_bytes"] = handed_bytes(to_columns(placed))
    out["pickled_bytes_before"] = len(pickle.dumps(prepared, 5))
    voxels = int(np.prod(placed.shape))
    out["handover_bytes_per_voxel"] = out["handover_bytes"] / voxels
    if not np.array_equal(pair.image.data, reference):
        raise SystemExit("the loader read other voxels than nibabel")
    result = load_subject(row, cfg, "bench", frozenset())
    if result["status"] != "ready":
        raise SystemExit(f"load_subject failed: {result['message']}")
    parts["load_subject (the loader task)"] = timed(
        lambda: load_subject(row, cfg, "bench", frozenset()), repeats
    )
    out["parts"] = parts
    fastest = min(v["cpu_min"] for k, v in parts.items() if k.startswith("gzip decode"))
    out["fastest_decode_cpu_s"] = fastest
    out["t_loader_cpu_s"] = parts["load_subject (the loader task)"]["cpu_min"]
    out["t_loader_over_decode"] = out["t_loader_cpu_s"] / fastest
    return out


def table(result: dict[str, Any]) -> str:
    lines = ["| part | wall min s | wall median s | CPU min s |", "|---|---:|---:|---:|"]
    for name, t in result["parts"].items():
        lines.append(
            f"| {name} | {t['wall_min']:.3f} | {t['wall_median']:.3f} | {t['cpu_min']:.3f} |"
        )
    lines.append(
        f"\nhanded over: {result['handover_bytes'] / 2**20:.1f} MiB "
        f"({result['handover_bytes_per_voxel']:.2f} B/voxel; pickled float32 before: "
        f"{result['pickled_bytes_before'] / 2**20:.1f} MiB); t_loader CPU "
        f"{result['t_loader_cpu_s']:.3f} s = {result['t_loader_over_decode']:.2f}x the "
        f"fastest decode ({result['fastest_decode_cpu_s']:.3f} s)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--make", type=Path, help="write the full-size pair into this folder")
    p.add_argument("--data", type=Path, help="folder holding ct.nii.gz and seg.nii.gz")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = p.parse_args(argv)
    if args.make:
        print(make_full_size(args.make))
    if args.data:
        result = measure(args.data / "ct.nii.gz", args.data / "seg.nii.gz", args.repeats)
        print(table(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
