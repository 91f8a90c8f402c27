"""cohort: deep region features and defensible statistics for CT cohorts."""

__version__ = "0.1.0"
