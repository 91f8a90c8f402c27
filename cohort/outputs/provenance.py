"""What a run records about itself: ``run.json``, package versions, saved settings."""

from __future__ import annotations

import dataclasses
import json
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from cohort import __version__
from cohort.config import AdjustConfig, StatsConfig
from cohort.errors import OutputError

__all__ = ["RUN_JSON", "read_run", "saved_adjust_config", "saved_stats_config", "versions"]

RUN_JSON: Final = "run.json"


def versions() -> dict[str, str]:
    """Versions of Python and of every package that changes a result."""
    import nibabel
    import numpy
    import pandas
    import pyarrow
    import scipy
    import torch
    import torchvision

    return {
        "cohort": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": _installed("ray"),  # its metadata: an in-process run never imports Ray
        "numpy": numpy.__version__,
        "nibabel": nibabel.__version__,
        "pyarrow": pyarrow.__version__,
        "pandas": pandas.__version__,
        "scipy": scipy.__version__,
        # the 3D backbones (MONAI, safetensors) and the DICOM/NRRD readers (SimpleITK):
        # read from the installed metadata, so that recording them imports nothing
        **{name: _installed(name) for name in ("monai", "safetensors", "SimpleITK")},
    }


def _installed(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def read_run(folder: Path) -> dict[str, Any]:
    """``run.json`` of a finished run's folder; :class:`OutputError` when it is not one."""
    path = Path(folder) / RUN_JSON
    if not path.is_file():
        raise OutputError(
            f"{path} is missing; the folder must be the --out folder of a finished `cohort run`"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise OutputError(f"{path} is not readable JSON ({err}); rerun the analysis") from None
    if not isinstance(data, dict):
        raise OutputError(f"{path} does not hold a JSON object; rerun the analysis")
    return data


def saved_stats_config(run: Mapping[str, Any]) -> StatsConfig:
    """The statistics settings a run recorded (defaults for what it does not say)."""
    saved = dict(run.get("config", {}).get("stats", {}) or {})
    names = {f.name for f in dataclasses.fields(StatsConfig)}
    return StatsConfig(**{k: v for k, v in saved.items() if k in names})


def saved_adjust_config(run: Mapping[str, Any]) -> AdjustConfig:
    """The covariates, strata and harmonisation a run recorded (none for older runs)."""
    saved = dict(run.get("config", {}).get("adjust", {}) or {})
    names = {f.name for f in dataclasses.fields(AdjustConfig)}
    given = {k: v for k, v in saved.items() if k in names}
    if "covariates" in given:
        given["covariates"] = tuple(given["covariates"] or ())
    return AdjustConfig(**given)
