"""One subject's input stages chained: load -> check -> preprocess.

The pipeline's loader tasks, ``cohort validate`` and the tests all run the
stages through :class:`Stages`, which remembers the stage that is running, so
a failure is labelled with it (``errors.csv``'s ``stage`` column).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal

from cohort.config import LabelMap, PreprocessConfig
from cohort.inputs.geometry import Reach, check_pair
from cohort.inputs.preprocess import Prepared, preprocess_pair
from cohort.inputs.readers import VolumePair, load_pair

__all__ = ["STAGES", "Stage", "Stages"]

Stage = Literal["load", "check", "preprocess"]
STAGES: Final[tuple[Stage, ...]] = ("load", "check", "preprocess")


class Stages:
    """Runs a subject's stages in order; :attr:`stage` is the one running (or that failed)."""

    def __init__(self) -> None:
        self.stage: Stage = "load"

    def loaded(
        self,
        image: Path,
        mask: Path,
        labels: LabelMap,
        cfg: PreprocessConfig,
        *,
        series_uid: str | None = None,
    ) -> VolumePair:
        """Stage load: the pair as stored (only the named regions of a mask folder)."""
        self.stage = "load"
        return load_pair(image, mask, cfg, labels, series_uid=series_uid)

    def checked(
        self,
        image: Path,
        mask: Path,
        labels: LabelMap,
        cfg: PreprocessConfig,
        *,
        series_uid: str | None = None,
        reach: Reach | None = None,
    ) -> VolumePair:
        """Stages load and check; returns the pair as stored."""
        pair = self.loaded(image, mask, labels, cfg, series_uid=series_uid)
        return self.check(pair, labels, cfg, reach)

    def check(
        self, pair: VolumePair, labels: LabelMap, cfg: PreprocessConfig, reach: Reach | None
    ) -> VolumePair:
        """Stage check of a loaded pair; returns it."""
        self.stage = "check"
        check_pair(pair, labels, cfg, reach)
        return pair

    def preprocess(
        self,
        pair: VolumePair,
        labels: LabelMap,
        background: bool,
        cfg: PreprocessConfig,
        reach: Reach | None,
    ) -> Prepared:
        """Stage preprocess of a checked pair; returns the model's input."""
        self.stage = "preprocess"
        return preprocess_pair(pair, labels, background, cfg, reach)

    def prepared(
        self,
        image: Path,
        mask: Path,
        labels: LabelMap,
        background: bool,
        cfg: PreprocessConfig,
        *,
        series_uid: str | None = None,
        reach: Reach | None = None,
    ) -> Prepared:
        """All three stages; returns the model's input."""
        pair = self.checked(image, mask, labels, cfg, series_uid=series_uid, reach=reach)
        return self.preprocess(pair, labels, background, cfg, reach)
