"""The ``cohort`` command line: the group in :mod:`.main`, one module per command."""
