"""``python -m cohort``: the same as the ``cohort`` command."""

from cohort.cli.main import entry

entry()
