"""Read and validate the manifest: one row per subject.

Columns ``subject_id``, ``image`` and ``mask`` are required; ``cohort``
(default ``all``), ``labels`` (a per-row override of the run's labels:
``name=int,...`` for a label-map file, bare names ``liver,spleen`` for a mask
folder or ``.seg.nrrd``) and ``series_uid`` (which DICOM series of an image
folder; ``<empty>`` for a series whose SeriesInstanceUID is empty) are
optional. ``image`` is a NIfTI, NRRD or MetaImage file or a DICOM series
folder; ``mask`` a label-map file, a folder of binary masks or a ``.seg.nrrd``.
Relative paths resolve against the manifest's folder. Every value is read as
text, so an id like ``007`` stays ``"007"``.

Other columns are refused, except those the run names as covariates, strata
or harmonisation batch (``extra_columns``): their cells are kept as text on
each :class:`Subject` (``covariates``) for the reducer. A subjects table
(:func:`read_subjects_table`: ``subject_id`` plus such columns) gives them
instead, for example to a finished run.

Whether the image and mask files exist is not checked here: a missing file is
an error of that one subject (stage ``load``), not of the whole manifest.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cohort.config import LabelMap, format_label_map, parse_label_map
from cohort.errors import ConfigError, ManifestError

__all__ = [
    "ALLOWED_COLUMNS",
    "DEFAULT_COHORT",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "SUFFIXES",
    "Rows",
    "Subject",
    "read_manifest",
    "read_subjects_table",
    "write_manifest",
]

REQUIRED_COLUMNS: tuple[str, ...] = ("subject_id", "image", "mask")
OPTIONAL_COLUMNS: tuple[str, ...] = ("cohort", "labels", "series_uid")
ALLOWED_COLUMNS: tuple[str, ...] = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
DEFAULT_COHORT = "all"
SUFFIXES: tuple[str, ...] = (".csv", ".parquet")


@dataclass(frozen=True)
class Subject:
    """One manifest row, validated, with absolute paths."""

    subject_id: str  # as written in the manifest (never parsed as a number)
    image: Path  # CT volume: NIfTI, NRRD or MetaImage file, or DICOM series folder; absolute
    mask: Path  # label-map file, folder of binary masks, or .seg.nrrd; absolute
    cohort: str  # group name; "all" when the manifest has none
    labels: LabelMap | None  # per-row label map or region names; None = use the run's
    row: int  # 1-based data row number in the manifest, for messages
    series_uid: str | None = None  # the DICOM series of an image folder; None = its only one
    # (column, cell text) of the columns the run names as covariates, strata or batch
    covariates: tuple[tuple[str, str], ...] = ()


def read_manifest(path: Path, extra_columns: Sequence[str] = ()) -> tuple[Subject, ...]:
    """Read a CSV or Parquet manifest into validated :class:`Subject` rows.

    ``extra_columns``: columns besides :data:`ALLOWED_COLUMNS` that the manifest may
    hold (the run's covariates, strata and batch); the cells of those it holds are
    kept on each subject, as text. Raises :class:`ManifestError` naming the file,
    the row and the fix.
    """
    path = Path(path)
    header, rows = _read_table(path, "manifest")
    _check_columns(path, header, tuple(extra_columns))
    if not rows:
        raise ManifestError(
            f"manifest {path} has a header but no subject rows; add one row per subject "
            f"with columns {', '.join(REQUIRED_COLUMNS)}"
        )
    folder = Path(os.path.abspath(path)).parent
    subjects: list[Subject] = []
    first_row_of: dict[str, int] = {}
    kept = [name for name in header if name in extra_columns]
    for number, cells in rows:
        subject = _subject_from_cells(path, folder, number, dict(zip(header, cells, strict=True)))
        if kept:
            values = dict(zip(header, cells, strict=True))
            subject = replace(subject, covariates=tuple((name, values[name]) for name in kept))
        if subject.subject_id in first_row_of:
            raise ManifestError(
                f"manifest {path}: subject_id {subject.subject_id!r} appears in row "
                f"{first_row_of[subject.subject_id]} and again in row {number}; "
                "each subject must have one row with a unique id"
            )
        first_row_of[subject.subject_id] = number
        subjects.append(subject)
    return tuple(subjects)


def read_subjects_table(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """A subjects table (CSV or Parquet, ``subject_id`` plus any columns): the ids and,
    per other column, the cells as text (blank for a missing value), in file order.

    Raises :class:`ManifestError` naming the file and the fix when it cannot be read,
    lacks ``subject_id``, repeats a column or an id, or has a blank id.
    """
    path = Path(path)
    header, rows = _read_table(path, "subjects table")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated or "subject_id" not in header:
        problem = (
            f"column(s) {', '.join(repeated)} appear more than once"
            if repeated
            else f"no subject_id column (found {', '.join(header)})"
        )
        raise ManifestError(
            f"subjects table {path}: {problem}; it needs one subject_id column and one column "
            "per covariate, stratum or batch"
        )
    ids: list[str] = []
    columns: dict[str, list[str]] = {name: [] for name in header if name != "subject_id"}
    first_row_of: dict[str, int] = {}
    for number, cells in rows:
        values = dict(zip(header, cells, strict=True))
        sid = values["subject_id"]
        if not sid:
            raise ManifestError(
                f"subjects table {path}, row {number}: subject_id is blank; fill it in or "
                "remove the row"
            )
        if sid in first_row_of:
            raise ManifestError(
                f"subjects table {path}: subject_id {sid!r} appears in row {first_row_of[sid]} "
                f"and again in row {number}; each subject must have one row"
            )
        first_row_of[sid] = number
        ids.append(sid)
        for name in columns:
            columns[name].append(values[name])
    return ids, columns


def _read_table(path: Path, what: str) -> tuple[list[str], Rows]:
    """Header and rows of a CSV or Parquet file that must exist."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ManifestError(
            f"{what} {path}: expected a .csv or .parquet file, found suffix "
            f"{path.suffix or '(none)'!r}; save the {what} as CSV or Parquet"
        )
    if not path.is_file():
        raise ManifestError(
            f"{what} {path} does not exist or is not a file; check the path "
            "(relative paths are taken from the current directory)"
        )
    return _read_csv(path) if suffix == ".csv" else _read_parquet(path)


def write_manifest(subjects: Iterable[Subject], path: Path) -> Path:
    """Write ``subjects`` as a CSV manifest; paths inside its folder are written relative.

    The ``labels`` and ``series_uid`` columns are written only when some subject
    has one, and each covariate column that some subject has, after them.
    Returns ``path``.
    """
    path = Path(path)
    if path.suffix.lower() != ".csv":
        raise ManifestError(f"manifest {path}: write_manifest writes CSV; use a .csv name")
    items = list(subjects)
    folder = Path(os.path.abspath(path)).parent
    with_labels = any(s.labels is not None for s in items)
    with_series = any(s.series_uid is not None for s in items)
    columns = [*REQUIRED_COLUMNS, "cohort"] + (["labels"] if with_labels else [])
    columns += ["series_uid"] if with_series else []
    extra = list(dict.fromkeys(name for s in items for name, _ in s.covariates))
    columns += extra
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for s in items:
            cells = [s.subject_id, _relative(s.image, folder), _relative(s.mask, folder), s.cohort]
            if with_labels:
                cells.append("" if s.labels is None else format_label_map(s.labels))
            if with_series:
                cells.append(s.series_uid or "")
            values = dict(s.covariates)
            cells += [values.get(name, "") for name in extra]
            writer.writerow(cells)
    return path


def _relative(file: Path, folder: Path) -> str:
    """``file`` relative to ``folder`` when it lies inside it, else absolute."""
    absolute = Path(os.path.abspath(file))
    try:
        return absolute.relative_to(folder).as_posix()
    except ValueError:
        return str(absolute)


Rows = list[tuple[int, list[str]]]


def _read_csv(path: Path) -> tuple[list[str], Rows]:
    """Header and (row number, cells) of a CSV file, every cell as stripped text."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            records = list(csv.reader(handle))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(
            f"manifest {path} cannot be read as UTF-8 CSV ({exc}); save it as UTF-8 CSV"
        ) from None
    if not records or not any(cell.strip() for cell in records[0]):
        raise ManifestError(
            f"manifest {path} is empty; it needs a header row with columns "
            f"{', '.join(REQUIRED_COLUMNS)} and one row per subject"
        )
    header = [cell.strip() for cell in records[0]]
    rows: Rows = []
    for number, record in enumerate(records[1:], start=1):
        cells = [cell.strip() for cell in record]
        if not any(cells):
            continue  # a blank line; still counted so row numbers match the file
        if len(cells) > len(header):
            raise ManifestError(
                f"manifest {path}, row {number}: {len(cells)} cells but the header has "
                f"{len(header)} columns; remove the extra cells or quote values with commas"
            )
        rows.append((number, cells + [""] * (len(header) - len(cells))))
    return header, rows


def _read_parquet(path: Path) -> tuple[list[str], Rows]:
    """Header and (row number, cells) of a Parquet file; nulls become blank cells."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise ManifestError(
            f"manifest {path} cannot be read as Parquet ({exc}); rewrite it with "
            "pyarrow or pandas, or use CSV"
        ) from None
    header = [name.strip() for name in table.column_names]
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
    rows: Rows = []
    for index in range(table.num_rows):
        cells = ["" if col[index] is None else str(col[index]).strip() for col in columns]
        if any(cells):
            rows.append((index + 1, cells))
    return header, rows


def _check_columns(path: Path, header: Sequence[str], extra: tuple[str, ...]) -> None:
    """Required columns present, no unknown or repeated column names."""
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ManifestError(
            f"manifest {path}: column(s) {', '.join(repeated)} appear more than once; "
            "keep one of each"
        )
    unknown = [name for name in header if name not in ALLOWED_COLUMNS + extra]
    if unknown:
        raise ManifestError(
            f"manifest {path}: unknown column(s) {', '.join(repr(n) for n in unknown)}; "
            f"allowed columns are {', '.join(ALLOWED_COLUMNS)} (names are case-sensitive), "
            "and those the run names with --covariates, --strata or --harmonise"
        )
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise ManifestError(
            f"manifest {path}: missing required column(s) {', '.join(missing)}; "
            f"the header must name {', '.join(REQUIRED_COLUMNS)} "
            f"(optional: {', '.join(OPTIONAL_COLUMNS)})"
        )


def _subject_from_cells(path: Path, folder: Path, number: int, cells: dict[str, str]) -> Subject:
    """Validate one row's cells and build its :class:`Subject`."""
    for name in REQUIRED_COLUMNS:
        if not cells[name]:
            raise ManifestError(
                f"manifest {path}, row {number}: column {name!r} is blank; "
                f"fill in the {name} of this subject or remove the row"
            )
    labels: LabelMap | None = None
    label_text = cells.get("labels", "")
    if label_text:
        try:
            labels = parse_label_map(label_text)
        except ConfigError as exc:
            raise ManifestError(
                f"manifest {path}, row {number} (subject {cells['subject_id']!r}): "
                f"labels {label_text!r} cannot be used: {exc}; write it as NAME=INT,... "
                "(e.g. tibia=2,femur=1) for a label-map file, as bare names (e.g. "
                "liver,spleen) for a mask folder or .seg.nrrd, or leave the cell blank to use "
                "the run's labels"
            ) from None
    return Subject(
        subject_id=cells["subject_id"],
        image=_resolve(folder, cells["image"]),
        mask=_resolve(folder, cells["mask"]),
        cohort=cells.get("cohort", "") or DEFAULT_COHORT,
        labels=labels,
        row=number,
        series_uid=cells.get("series_uid", "") or None,
    )


def _resolve(folder: Path, cell: str) -> Path:
    """An absolute path: relative cells are taken from the manifest's folder."""
    candidate = Path(cell).expanduser()
    return candidate if candidate.is_absolute() else folder / candidate
