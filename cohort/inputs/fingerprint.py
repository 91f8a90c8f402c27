"""Content keys: file hashes and the fingerprints a rerun recognises a subject by.

Kept free of pandas, pyarrow and torch: every loader task and actor imports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from cohort import __version__
from cohort.config import RunConfig

__all__ = [
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
    """:func:`sha256_file` of a file; of a folder (a DICOM series, a mask folder), a
    fingerprint of the name and sha256 of every file directly in it."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    files = sorted(p for p in path.iterdir() if p.is_file())
    return fingerprint(["folder", *(f"{p.name}:{sha256_file(p)}" for p in files)])


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


def options_identity(cfg: RunConfig, weights_sha256: str) -> str:
    """Everything besides the input files that changes a subject's numbers."""
    parts = {
        "preprocess": dataclasses.asdict(cfg.preprocess),
        "background": cfg.regions.background,
        "model": {**dataclasses.asdict(cfg.model), "weights": weights_sha256, "seed": None},
        "pooling": dataclasses.asdict(cfg.pooling),
        "cohort": __version__,
    }
    return fingerprint([repr(sorted(parts.items()))])
