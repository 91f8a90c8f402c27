"""One subject's input stages chained: load -> check -> preprocess.

The pipeline's loader tasks, ``cohort validate`` and the tests all run the
stages through :class:`Stages`, which remembers the stage that is running, so
a failure is labelled with it (``errors.csv``'s ``stage`` column).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final, Literal

from cohort.config import LabelMap, PreprocessConfig
from cohort.inputs.geometry import check_pair
from cohort.inputs.preprocess import Prepared, preprocess_pair
from cohort.inputs.readers import load_pair
from cohort.inputs.volume import VolumePair

__all__ = ["STAGES", "Stage", "Stages", "prepare_subject"]

Stage = Literal["load", "check", "preprocess"]
STAGES: Final[tuple[Stage, ...]] = ("load", "check", "preprocess")
Reader = Callable[[Path, Path, PreprocessConfig], VolumePair]


class Stages:
    """Runs a subject's stages in order; :attr:`stage` is the one running (or that failed)."""

    def __init__(self) -> None:
        self.stage: Stage = "load"

    def checked(
        self,
        image: Path,
        mask: Path,
        labels: LabelMap,
        cfg: PreprocessConfig,
        *,
        read: Reader = load_pair,
    ) -> VolumePair:
        """Stages load and check; returns the pair as stored."""
        self.stage = "load"
        pair = read(image, mask, cfg)
        self.stage = "check"
        check_pair(pair, labels, cfg)
        return pair

    def prepared(
        self,
        image: Path,
        mask: Path,
        labels: LabelMap,
        background: bool,
        cfg: PreprocessConfig,
        *,
        read: Reader = load_pair,
    ) -> Prepared:
        """All three stages; returns the model's input."""
        pair = self.checked(image, mask, labels, cfg, read=read)
        self.stage = "preprocess"
        return preprocess_pair(pair, labels, background, cfg)


def prepare_subject(
    image: Path, mask: Path, labels: LabelMap, background: bool, cfg: PreprocessConfig
) -> Prepared:
    """Load, check and preprocess one subject; returns the model's input."""
    return Stages().prepared(image, mask, labels, background, cfg)
