"""What every test shares: its result record, seeded generators and scipy calls.

Conventions of the statistics, in one place:

- Orders: regions, region pairs and layers keep their order of first
  appearance in the input (``conv-1, conv-3, conv-5``; ``tibia-femur`` before
  ``tibia-background``); cohorts are sorted by name; inside a test subjects are
  sorted by id, so a test does not depend on the order rows arrived in.
- Randomness: each bootstrap or permutation draws from its own
  ``numpy.random.default_rng([cfg.seed, zlib.crc32(key)])`` (:func:`rng_for`)
  where ``key`` names the test (family, cohorts, layer, pair, test), so adding
  or removing a test never changes the draws of another.
- A p-value is NaN only on a :class:`Result` with ``status == "skipped"``,
  and then ``reason`` says why.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = ["FloatArray", "IntArray", "Result", "TestRow", "rng_for"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


Status = Literal["ok", "skipped"]


@dataclass(frozen=True)
class Result:
    """Outcome of one test on plain arrays.

    ``n`` is the number of subjects the test used (after dropping missing
    values), or had, when skipped. ``reason`` says why a test was skipped, or
    what was dropped from one that ran ("" when nothing was).
    """

    n: int
    statistic: float
    p_value: float
    effect_size: float
    ci_low: float
    ci_high: float
    status: Status
    reason: str
    below_min_n: bool = False


@dataclass(frozen=True)
class TestRow:
    """One row of the tests table before q-values: what was tested, where, and the result."""

    family: str
    cohort: str
    layer: str
    pair: str
    test: str
    effect_name: str
    result: Result


def skipped(n: int, reason: str, *, below_min_n: bool = False) -> Result:
    nan = float("nan")
    return Result(n, nan, nan, nan, nan, nan, "skipped", reason, below_min_n)


def join_notes(*notes: str) -> str:
    return "; ".join(note for note in notes if note)


def rng_for(seed: int, key: str) -> np.random.Generator:
    """The generator of one test: seeded by ``cfg.seed`` and a CRC-32 of its key."""
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def call_scipy(call: Callable[[], object]) -> tuple[object | None, str]:
    """Run a scipy test; return (result, note) with warnings and errors as text."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = call()
        except (ValueError, ZeroDivisionError, FloatingPointError) as error:
            return None, f"scipy: {error}"
    note = "; ".join(sorted({f"scipy: {w.message}" for w in caught}))
    return result, note


def finish(
    result: object | None,
    note: str,
    n: int,
    effect: float,
    ci: tuple[float, float],
    dropped: str,
) -> Result:
    """Turn a scipy result into a Result, refusing a silent NaN p-value."""
    if result is None:
        return skipped(n, join_notes(dropped, note))
    statistic = float(getattr(result, "statistic"))  # noqa: B009 - scipy result objects
    p_value = float(getattr(result, "pvalue"))  # noqa: B009
    if not np.isfinite(p_value):
        return skipped(n, join_notes(dropped, note, "scipy returned no p-value"))
    return Result(n, statistic, p_value, effect, ci[0], ci[1], "ok", join_notes(dropped, note))


def dropped_note(count: int, what: str) -> str:
    return f"dropped {count} subject(s) with {what}" if count else ""


def small_groups_note(sizes: Sequence[int], names: Sequence[str], min_n: int) -> str:
    small = [f"{name} n={size}" for name, size in zip(names, sizes, strict=True) if size < min_n]
    return f"{', '.join(small)} below min_n={min_n}" if small else ""
