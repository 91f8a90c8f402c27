"""HTML building blocks: escaping, tables, figures, and the page under construction.

The page's CSS and scripts are package data files (``static/``), read once.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import pandas as pd

from cohort.report.figures import Figured, save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Page", "escape", "figure_html", "html_table", "paragraph", "static_text"]

_NAN_TEXT: Final = "–"


@cache
def static_text(name: str) -> str:
    """A file of the report's static assets (``report.css``, ``report.js``, ``errors.js``)."""
    return (resources.files("cohort.report") / "static" / name).read_text(encoding="utf-8")


def escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def _number(value: object, digits: int = 4, fixed: bool = False) -> tuple[str, str]:
    """(text, sort key) of a cell: ``digits`` significant digits, or decimals when ``fixed``."""
    if isinstance(value, bool | np.bool_):
        return str(value), ""
    if isinstance(value, int | np.integer):
        return f"{int(value):,}", str(int(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        if not math.isfinite(v):
            return _NAN_TEXT, ""
        return (f"{v:.{digits}f}" if fixed else f"{v:.{digits}g}"), repr(v)
    return str(value), ""


def html_table(
    frame: pd.DataFrame,
    *,
    digits: Mapping[str, int] | None = None,
    row_class: Sequence[str] | None = None,
    table_id: str = "",
    sortable: bool = True,
    fixed: bool = False,
) -> str:
    """A plain HTML table; numeric cells carry ``data-v`` for sorting.

    ``digits`` maps a column to its significant digits (decimals when ``fixed``).
    """
    digits = digits or {}
    head = "".join(f"<th>{escape(c)}</th>" for c in frame.columns)
    body = []
    for i, row in enumerate(frame.itertuples(index=False)):
        cells = []
        for column, value in zip(frame.columns, row, strict=True):
            text, key = _number(value, digits.get(str(column), 4), fixed)
            attr = f' data-v="{escape(key)}"' if key else ""
            cells.append(f"<td{attr}>{escape(text)}</td>")
        cls = row_class[i] if row_class is not None and row_class[i] else ""
        body.append(f'<tr class="{cls}">' if cls else "<tr>")
        body.append("".join(cells) + "</tr>")
    classes = "data sortable" if sortable else "data"
    ident = f' id="{escape(table_id)}"' if table_id else ""
    return (
        f'<div class="scroll"><table class="{classes}"{ident}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def figure_html(fig: Figured) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (
        f'<figure id="fig-{escape(fig.name)}"><img src="data:image/png;base64,{data}" '
        f'alt="{escape(fig.alt)}"><figcaption>{fig.caption} '
        f'<span class="files">Files: <a href="{escape(fig.name)}.png">{escape(fig.name)}.png</a>, '
        f'<a href="{escape(fig.name)}.svg">{escape(fig.name)}.svg</a></span></figcaption></figure>'
    )


def paragraph(text: str, cls: str = "") -> str:
    return f'<p class="{cls}">{text}</p>' if cls else f"<p>{text}</p>"


@dataclass
class Page:
    out: Path
    sections: list[str] = field(default_factory=list)
    toc: list[tuple[str, str]] = field(default_factory=list)
    figures: list[Figured] = field(default_factory=list)

    def section(self, anchor: str, title: str, *parts: str) -> None:
        self.toc.append((anchor, title))
        self.sections.append(
            f'<section id="{anchor}"><h2>{escape(title)}</h2>{"".join(parts)}</section>'
        )

    def figure(self, fig: Figure, name: str, alt: str, caption: str) -> str:
        saved = save_figure(fig, self.out, name, alt, caption)
        self.figures.append(saved)
        return figure_html(saved)
