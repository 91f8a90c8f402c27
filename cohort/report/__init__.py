"""The HTML report of a finished run: :func:`write_report`.

=================  ==========================================================
:mod:`.results`    read a result folder
:mod:`.figures`    matplotlib figures, saved as PNG and SVG
:mod:`.subjects`   every subject, robust outliers
:mod:`.markup`     HTML blocks; CSS and scripts in ``static/``
:mod:`.sections`   overlays, cards, tests, errors, provenance
:mod:`.page`       the page, in order
=================  ==========================================================

:mod:`.robustness` adds a section to the page of a ``cohort robustness`` folder.
"""

from cohort.report.page import REPORT_DIR, REPORT_FILE, write_report

__all__ = ["REPORT_DIR", "REPORT_FILE", "write_report"]
