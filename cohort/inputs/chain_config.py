"""The settings of ``cohort robustness``: which perturbations, how large, and the ICC's rule.

Frozen and validated once, like :mod:`cohort.config`; kept free of numpy so that the
command line reads its choices and defaults from here without importing the
perturbations themselves (:mod:`cohort.inputs.chain` applies them).

References
----------
Zwanenburg A, Leger S, Agolli L, et al. Assessing robustness of radiomic
features by image perturbation. Scientific Reports 2019; 9: 614.
doi:10.1038/s41598-018-36938-4
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Final, Literal, get_args

from cohort.errors import ConfigError

__all__ = [
    "COMPONENTS",
    "DEFAULT_CHAIN",
    "Component",
    "PerturbationConfig",
    "RobustnessConfig",
    "parse_chain",
]

Component = Literal["noise", "translate", "rotate", "volume", "contour"]
COMPONENTS: Final[tuple[Component, ...]] = get_args(Component)
# Zwanenburg et al. (2019): noise addition, translation, volume adaptation, contour
# randomisation identified the fewest falsely robust features against test-retest CT
DEFAULT_CHAIN: Final[tuple[Component, ...]] = ("noise", "translate", "volume", "contour")


def parse_chain(text: str) -> tuple[Component, ...]:
    """``"noise,translate"`` -> ``("noise", "translate")``; unknown or repeated names
    are a :class:`ConfigError` listing the components."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    chain: list[Component] = []
    for name in names:
        if name not in COMPONENTS:
            raise ConfigError(
                f"unknown perturbation {name!r} in the chain {text!r}; choose from "
                f"{', '.join(COMPONENTS)}"
            )
        chain.append(name)
    return tuple(chain)


@dataclass(frozen=True)
class PerturbationConfig:
    """What ``cohort robustness`` perturbs, and by how much (see the module docstring)."""

    chain: tuple[Component, ...] = DEFAULT_CHAIN  # components, each once
    count: int = 10  # K perturbed versions per subject (perturbation 0 is the original)
    seed: int = 0  # seeds every draw, with the subject's id and the perturbation index
    shift_voxels: float = 1.0  # translate: uniform in [-s, s] voxels along each image axis
    angle_deg: float = 3.0  # rotate: uniform in [-a, a] degrees about a random axis
    volume_low: float = -0.2  # volume: the fraction is uniform in [low, high]
    volume_high: float = 0.2
    contour_mm: float = 1.5  # contour: the band redrawn around the boundary, and the field's SD
    noise_scale: float = 1.0  # noise: SD = this x the image's estimated noise level

    def __post_init__(self) -> None:
        if not self.chain:
            raise ConfigError(f"the perturbation chain is empty; name some of {COMPONENTS}")
        parse_chain(",".join(self.chain))
        if len(set(self.chain)) != len(self.chain):
            raise ConfigError(f"perturbations repeat in the chain {self.chain}; name each once")
        if self.count < 2:
            raise ConfigError(
                f"--perturbations must be >= 2 (an ICC needs two measurements), got {self.count}"
            )
        if self.seed < 0:
            raise ConfigError(f"the perturbation seed must be >= 0, got {self.seed}")
        for name, value in (
            ("shift", self.shift_voxels),
            ("angle", self.angle_deg),
            ("noise scale", self.noise_scale),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"the {name} must be a finite number >= 0, got {value}")
        if not -1.0 <= self.volume_low <= self.volume_high:
            raise ConfigError(
                f"the volume change range must have -1 <= low <= high, got "
                f"[{self.volume_low}, {self.volume_high}]"
            )
        if not (math.isfinite(self.contour_mm) and self.contour_mm > 0):
            raise ConfigError(f"the contour band must be > 0 mm, got {self.contour_mm}")

    def spec(self, index: int) -> str:
        """Perturbation ``index``'s spec as canonical JSON: what a loader needs to draw
        and apply it (``count`` left out: more perturbations keep the first ones)."""
        values = {k: v for k, v in dataclasses.asdict(self).items() if k != "count"}
        return json.dumps({**values, "chain": list(self.chain), "index": index}, sort_keys=True)

    @classmethod
    def from_spec(cls, text: str) -> tuple[PerturbationConfig, int]:
        """The config and index of a :meth:`spec` text."""
        values = json.loads(text)
        index = int(values.pop("index"))
        values["chain"] = tuple(values["chain"])
        return cls(**values), index


@dataclass(frozen=True)
class RobustnessConfig:
    """``cohort robustness``'s settings: the perturbations and the ICC's rule."""

    perturb: PerturbationConfig = field(default_factory=PerturbationConfig)
    threshold: float = 0.90  # robust: ICC(1,1)'s lower CI bound >= this (Zwanenburg 2019)
    level: float = 0.95  # coverage of the ICCs' intervals

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--icc-threshold must lie in [-1, 1], got {self.threshold}")
        if not 0.0 < self.level < 1.0:
            raise ConfigError(f"the ICC CI level must lie in (0, 1), got {self.level}")
