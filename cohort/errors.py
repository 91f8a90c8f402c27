"""The exception hierarchy.

Every error the package raises on purpose is a :class:`CohortError` and also
subclasses the builtin that fits, so callers can catch either. Messages name
the file or module, what was expected, what was found and the next step.
"""

from __future__ import annotations


class CohortError(Exception):
    """Base class of every deliberate error in cohort."""


class ConfigError(CohortError, ValueError):
    """An option or configuration value is invalid."""


class ManifestError(CohortError, ValueError):
    """The manifest cannot be used (missing columns, duplicate ids, bad cells)."""


class InputError(CohortError, ValueError):
    """One subject's input files cannot be used (unreadable, wrong content)."""


class GeometryError(InputError):
    """Image and mask disagree on grid or orientation, or a shape is unusable."""


class RegionError(InputError):
    """A region is empty or too small for a hooked layer."""


class ModelError(CohortError, ValueError):
    """A model cannot be built, inflated or hooked as asked."""


class InflationError(ModelError):
    """A 2D module or weight could not be carried over to 3D."""


class WeightsError(ModelError):
    """Weights cannot be had, or do not match what was expected."""
