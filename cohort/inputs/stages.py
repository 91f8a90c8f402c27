"""One subject's input stages chained: load -> check -> preprocess.

The pipeline's loader tasks, ``cohort validate`` and the tests all run the
stages through :class:`Stages`, which remembers the stage that is running, so
a failure is labelled with it (``errors.csv``'s ``stage`` column).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal

from cohort.config import LabelMap, PreprocessConfig
from cohort.inputs.geometry import Reach, check_pair
from cohort.inputs.preprocess import Placed, Prepared, place_pair, preprocess_pair
from cohort.inputs.readers import VolumePair, load_pair

__all__ = ["STAGES", "Stage", "Stages", "prepare"]

Stage = Literal["load", "check", "preprocess"]
STAGES: Final[tuple[Stage, ...]] = ("load", "check", "preprocess")


class Stages:
    """One subject's stages under one configuration, run in order.

    ``labels`` are the regions to read, ``cfg`` the preprocessing and ``reach``
    what the hooked layers need of the model input (None: not checked).
    :attr:`stage` is the stage running, or the one that failed.
    """

    def __init__(self, labels: LabelMap, cfg: PreprocessConfig, reach: Reach | None = None):
        self.labels, self.cfg, self.reach = labels, cfg, reach
        self.stage: Stage = "load"

    def loaded(
        self,
        image: Path,
        mask: Path,
        series_uid: str | None = None,
        contents: Mapping[Path, bytes] | None = None,
    ) -> VolumePair:
        """Stage load: the pair as stored (only the named regions of a mask folder);
        ``contents``: bytes of its files read already (:func:`load_pair`)."""
        self.stage = "load"
        return load_pair(
            image, mask, self.cfg, self.labels, series_uid=series_uid, contents=contents
        )

    def check(self, pair: VolumePair) -> VolumePair:
        """Stage check of a loaded pair; returns it, its mask re-indexed onto the image's
        stored axes when it is the image's grid stored otherwise."""
        self.stage = "check"
        return check_pair(pair, self.labels, self.cfg, self.reach)

    def checked(self, image: Path, mask: Path, series_uid: str | None = None) -> VolumePair:
        """Stages load and check; returns the pair as stored."""
        return self.check(self.loaded(image, mask, series_uid))

    def preprocess(self, pair: VolumePair, background: bool) -> Prepared:
        """Stage preprocess of a checked pair (``background``: add that region); returns the
        model's input."""
        self.stage = "preprocess"
        return preprocess_pair(pair, self.labels, background, self.cfg, self.reach)

    def place(self, pair: VolumePair, background: bool) -> Placed:
        """Stage preprocess of a checked pair without the intensity work or the image's
        resampling (the feature actor does those on its device); returns what the
        loader hands over."""
        self.stage = "preprocess"
        return place_pair(pair, self.labels, background, self.cfg, self.reach, defer=True)

    def prepared(self, image: Path, mask: Path, background: bool) -> Prepared:
        """All three stages; returns the model's input."""
        return self.preprocess(self.checked(image, mask), background)


def prepare(
    image: Path,
    mask: Path,
    labels: LabelMap,
    background: bool,
    cfg: PreprocessConfig,
    reach: Reach | None = None,
) -> Prepared:
    """All three stages of one subject, for scripts and tests; returns the model's input."""
    return Stages(labels, cfg, reach).prepared(image, mask, background)
