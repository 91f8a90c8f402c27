"""Content keys: file hashes and the fingerprints a rerun recognises a subject by.

Kept free of pandas, pyarrow and torch: every loader task and actor imports it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from cohort import __version__
from cohort.config import RunConfig

__all__ = [
    "IN_KEY",
    "OUT_OF_KEY",
    "config_value",
    "content_hash",
    "data_files",
    "execution_identity",
    "fingerprint",
    "options_identity",
    "sha256_file",
    "sha256_path",
    "subject_key",
]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_path(path: Path) -> str:
    """:func:`content_hash` of a file; of a folder (a DICOM series, a mask folder), a
    fingerprint of the name and content hash of every file directly in it."""
    path = Path(path)
    if not path.is_dir():
        return content_hash(path, path.read_bytes())
    files = sorted(p for p in path.iterdir() if p.is_file())
    return fingerprint(["folder", *(f"{p.name}:{sha256_path(p)}" for p in files)])


def content_hash(path: Path, raw: bytes) -> str:
    """sha256 of a file's bytes ``raw``; for a detached header (``.mhd``, ``.nhdr``)
    also of every data file it names, so a corrected ``ct.raw`` moves the key."""
    digest = hashlib.sha256(raw).hexdigest()
    detached = data_files(Path(path), raw)
    if not detached:
        return digest
    return fingerprint(["detached", digest, *(f"{p.name}:{sha256_file(p)}" for p in detached)])


_MHD_DATA = re.compile(rb"^\s*ElementDataFile\s*=\s*(.*?)\s*$", re.M)
_NHDR_DATA = re.compile(rb"^\s*data ?file\s*:\s*(.*?)\s*$", re.M | re.I)


def data_files(path: Path, raw: bytes) -> list[Path]:
    """The data files a detached MetaImage (``.mhd``) or NRRD (``.nhdr``) header ``raw``
    names: one file, a ``LIST`` of them, or a printf pattern with min, max and step;
    none for any other file (or ``LOCAL``: the data follow the header)."""
    suffix = path.name.lower()
    if suffix.endswith(".mhd"):
        found = _MHD_DATA.search(raw)
    elif suffix.endswith(".nhdr"):
        found = _NHDR_DATA.search(raw)
    else:
        return []
    if found is None:
        return []
    value = found.group(1).decode("utf-8", "replace").strip()
    words = value.split()
    if not words or words[0] == "LOCAL":
        return []
    if words[0] == "LIST":  # the names follow, one per line, to the end of the header
        tail = raw[found.end() :].decode("utf-8", "replace").splitlines()
        return [path.parent / line.strip() for line in tail if line.strip()]
    if "%" in words[0] and len(words) >= 4:  # printf pattern, min, max, step
        start, stop, step = (int(w) for w in words[1:4])
        if step == 0:
            return [path.parent / (words[0] % start)]
        stop += 1 if step > 0 else -1
        return [path.parent / (words[0] % n) for n in range(start, stop, step)]
    return [path.parent / value]


def fingerprint(parts: Iterable[str]) -> str:
    """Hex sha256 of strings, each ended by a NUL so that boundaries count."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def subject_key(subject_id: str, print_: str) -> str:
    """A file-name-safe key: readable id, then a hash that also separates ids
    that differ only in unsafe characters."""
    safe = _UNSAFE.sub("_", subject_id)[:64]
    return f"{safe}--{fingerprint([subject_id, print_])[:20]}"


# Every field of RunConfig, by its dotted path, is in the resume key (it changes a
# subject's numbers) or out of it (it does not), with the reason; a test walks the
# configs, so a new field must be classified here before it can land.
IN_KEY: Final[Mapping[str, str]] = {
    "preprocess.hu_min": "the HU window scales the model input; its low end is masked-input's air",
    "preprocess.hu_max": "the HU window scales the model input",
    "preprocess.preset": "the backbone's published preprocessing the values start from",
    "preprocess.normalise": "fixed or per-volume foreground statistics normalise the input",
    "preprocess.mean": "normalises the model input",
    "preprocess.std": "normalises the model input",
    "preprocess.foreground_hu": "which voxels the foreground statistics (normalise) use",
    "preprocess.axes": "the direction of the model input's axes changes what the network sees",
    "preprocess.target_spacing": "resampling changes the grid the network sees",
    "preprocess.crop_margin_mm": "cropping changes the field of view and the background region",
    "preprocess.mask_resample": "a mask on another grid is resampled (numbers) or refused",
    "regions.background": "adds or removes the background region's vectors",
    "model.backbone": "another network",
    "model.inflation": "another 3D kernel from the same 2D weights",
    "model.layers": "which feature maps are pooled",
    "model.precision": "bf16 changes the feature maps",
    "pooling.mode": "another pooling protocol",
    "pooling.gem_p": "the GeM exponent; in the key only with masked-gem, the mode that uses it",
}
OUT_OF_KEY: Final[Mapping[str, str]] = {
    "preprocess.affine_tolerance_mm": "decides whether a subject is refused, never its numbers",
    "preprocess.max_voxels": "decides whether a subject is refused, never its numbers",
    "regions.labels": "the run's default map; each subject's own map is hashed with its files",
    "model.weights": "names the weights, whose sha256 is in the key instead",
    "model.seed": "seeds random weights, whose sha256 is in the key instead",
    "model.weights_sha256": "checks the weights file, whose own sha256 is in the key",
    "pooling.min_coverage": "decides whether a region is refused, never its vector",
    "execution.device": "the device the run resolves it to is in the key "
    "(execution_identity), not the option: auto and cpu on a machine without GPUs agree",
    "execution.address": "where the run goes",
    "execution.executor": "the same stage code in this process or on Ray; equal vectors at "
    "equal torch threads (tests/test_in_process.py)",
    "execution.num_actors": "how wide the run goes; the torch threads it leaves each actor "
    "are in the key (execution_identity)",
    "execution.actor_cpus": "resources of the actors",
    "execution.loader_cpus": "resources of the loaders",
    "execution.torch_threads": "the threads a run resolves (this option, or the CPUs per "
    "actor) are in the key (execution_identity), whatever gave them",
    "execution.progress": "what is printed",
    "execution.stall_timeout_s": "when a hung run stops",
    "execution.max_retries": "how often a failed attempt is repeated",
    "execution.actor_memory_gb": "what the actors reserve",
    "stats.bootstrap": "statistics are recomputed from the parts by every run",
    "stats.permutations": "statistics are recomputed from the parts by every run",
    "stats.seed": "statistics are recomputed from the parts by every run",
    "stats.alpha": "statistics are recomputed from the parts by every run",
    "stats.min_n": "statistics are recomputed from the parts by every run",
    "stats.centre": "statistics are recomputed from the parts by every run",
    "stats.ci_level": "statistics are recomputed from the parts by every run",
    "adjust.covariates": "statistics are recomputed from the parts by every run",
    "adjust.strata": "statistics are recomputed from the parts by every run",
    "adjust.harmonise": "harmonised vectors are recomputed from the parts by every run; the "
    "parts keep the raw ones",
    "adjust.harmonise_with": "harmonised vectors are recomputed from the parts by every run; "
    "the parts keep the raw ones",
    "adjust.drop_incomplete": "statistics are recomputed from the parts by every run",
    "adjust.subjects_table": "statistics are recomputed from the parts by every run",
}


def config_value(cfg: RunConfig, path: str) -> Any:
    """The value of a dotted field path such as ``"model.layers"``."""
    value: Any = cfg
    for name in path.split("."):
        value = getattr(value, name)
    return value


def execution_identity(identity: str, device: str, threads: int | None) -> str:
    """:func:`options_identity` with where the network runs and with how many torch
    threads: both change float32 reductions' order, so vectors at the last digits
    (1e-5 has been measured between thread counts), so both are in the key."""
    return fingerprint([identity, f"device={device}", f"threads={threads}"])


def options_identity(cfg: RunConfig, weights_sha256: str) -> str:
    """Everything besides a subject's files that changes its numbers, as one hash:
    the fields of :data:`IN_KEY`, the weights' sha256 and this package's version."""
    used = {
        path: config_value(cfg, path)
        for path in IN_KEY
        if path != "pooling.gem_p" or cfg.pooling.mode == "masked-gem"
    }
    parts = {"options": used, "weights": weights_sha256, "cohort": __version__}
    return fingerprint([repr(sorted(parts.items()))])
