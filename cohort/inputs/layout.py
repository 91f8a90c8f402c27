"""A manifest from a folder layout: subjects found by path patterns.

A pattern is a path under the root folder, ``/``-separated, with named
fields and glob wildcards:

- ``{subject}`` (required) matches one path part or a piece of one (no ``/``)
  and becomes the subject id; it may appear more than once, with one value;
- ``{cohort}`` (optional) likewise names the subject's cohort;
- ``*`` matches any characters within a path part, ``?`` one character, and
  ``**/`` any number of whole folders (none included).

A pattern may match files (NIfTI, NRRD, a ``.seg.nrrd``) or folders (a DICOM
series, a folder of masks). For example ``{cohort}/{subject}/ct.nii.gz`` with
``{cohort}/{subject}/seg.nii.gz``, or ``images/{subject}_0000.nii.gz`` with
``labels/{subject}.nii.gz``. A subject needs an image and a mask; a file
matched by one pattern whose subject has no match of the other is reported
as unmatched, not guessed at.

With ``match_by_uid`` there is no image pattern: the mask pattern finds DICOM
SEG and RTSTRUCT files (or folders holding one; other files it matches are
passed over), and each is paired with the image series it references by
SeriesInstanceUID, found among every DICOM image file under the root (a folder
of mixed DICOM files, as PACS exports arrive). The row's image is the folder
holding that series' files and its ``series_uid`` the UID.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cohort.errors import ConfigError, InputError, ManifestError
from cohort.inputs.dicom_objects import dicom_object, find_dicom_mask, is_dicom_file
from cohort.inputs.manifest import DEFAULT_COHORT, Subject

__all__ = ["Found", "Layout", "Skipped", "compile_pattern", "find_layout", "read_cohort_table"]

_FIELDS = ("subject", "cohort")
_TOKEN = re.compile(r"\{([^{}]*)\}|\*\*/|\*|\?")


@dataclass(frozen=True)
class Found:
    """One path a pattern matched, with the fields it gave."""

    path: Path  # absolute
    subject: str
    cohort: str | None  # from a {cohort} field, if the pattern has one


@dataclass(frozen=True)
class Skipped:
    """A folder under the root that was not searched, and why."""

    path: Path
    reason: str  # "cannot be read (Permission denied)", "not followed: a link back to ..."

    @property
    def unreadable(self) -> bool:
        """True when the folder could not be read (a loop skipped loses nothing)."""
        return self.reason.startswith("cannot be read")


@dataclass(frozen=True)
class Layout:
    """What a folder layout gives: subjects with an image and a mask, and the rest."""

    subjects: tuple[Subject, ...]  # sorted by subject id
    images_without_mask: tuple[Found, ...]
    masks_without_image: tuple[Found, ...]
    notes: tuple[str, ...] = ()  # why masks have no image (match by UID), what was passed over
    skipped: tuple[Skipped, ...] = ()  # folders not searched (unreadable, a link loop)

    @property
    def unreadable(self) -> int:
        """Folders that could not be read: subjects in them may be missing."""
        return sum(s.unreadable for s in self.skipped)

    @property
    def unmatched(self) -> int:
        return len(self.images_without_mask) + len(self.masks_without_image)


def compile_pattern(pattern: str, option: str) -> re.Pattern[str]:
    """A pattern (see the module docstring) as a regular expression over posix paths
    relative to the root; ``option`` names it in messages."""
    text = pattern.strip().replace("\\", "/").strip("/")
    if not text:
        raise ConfigError(f"{option} is empty; give a path pattern such as '{{subject}}/ct.nii.gz'")
    parts: list[str] = []
    seen: set[str] = set()
    position = 0
    for match in _TOKEN.finditer(text):
        parts.append(re.escape(text[position : match.start()]))
        position = match.end()
        token = match.group(0)
        if token == "**/":
            parts.append(r"(?:[^/]+/)*")
        elif token == "*":
            parts.append(r"[^/]*")
        elif token == "?":
            parts.append(r"[^/]")
        else:
            name = match.group(1)
            if name not in _FIELDS:
                raise ConfigError(
                    f"{option} {pattern!r} has the field {token}; the fields are "
                    f"{', '.join('{' + f + '}' for f in _FIELDS)} (write other text as it is, "
                    "and * or ? for any characters)"
                )
            parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>[^/]+)")
            seen.add(name)
    parts.append(re.escape(text[position:]))
    if "subject" not in seen:
        raise ConfigError(
            f"{option} {pattern!r} has no {{subject}} field; mark the part of the path that is "
            "the subject id, e.g. '{subject}/ct.nii.gz' or 'images/{subject}.nii.gz'"
        )
    return re.compile("".join(parts))


def _matches(root: Path, regex: re.Pattern[str]) -> tuple[list[Found], list[Skipped]]:
    """Every file and folder under ``root`` whose relative path matches ``regex``
    (hidden ones, named ``.*``, and what they hold are left out), and the folders
    that were not searched.

    Symlinked folders are followed (archives are often farms of links), except a
    link back to a folder on its own path (``latest -> ..``), which would loop:
    that one is listed as skipped, and what it points to is searched where it
    is. A folder that cannot be listed (permission denied, an I/O error) is
    listed as skipped with the reason; the rest is still searched.
    """
    found: list[Found] = []
    skipped: list[Skipped] = []
    for folder, folders, files in _walk(root, skipped):
        base = Path(folder).relative_to(root)
        for name in sorted([*folders, *files]):
            relative = (base / name).as_posix()
            match = regex.fullmatch(relative)
            if match:
                fields = match.groupdict()
                found.append(Found(root / relative, fields["subject"], fields.get("cohort")))
    return found, skipped


def _walk(root: Path, skipped: list[Skipped]) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` of ``root`` that follows symlinked folders except those that would
    loop, and leaves hidden names out; yields each folder with its subfolders and
    files (sorted). Loops and folders that cannot be listed go into ``skipped``."""
    # each folder's own identity and its ancestors' (device, inode), as reached
    above: dict[str, frozenset[tuple[int, int]]] = {str(root): frozenset({_identity(root)})}

    def unreadable(err: OSError) -> None:
        where = Path(err.filename) if err.filename else root
        skipped.append(Skipped(where, f"cannot be read ({err.strerror or err})"))

    for folder, folders, files in os.walk(root, onerror=unreadable, followlinks=True):
        chain = above.pop(folder, frozenset())
        kept = []
        for name in sorted(name for name in folders if not name.startswith(".")):
            path = os.path.join(folder, name)
            try:
                identity = _identity(Path(path))
            except OSError as err:
                skipped.append(Skipped(Path(path), f"cannot be read ({err.strerror or err})"))
                continue
            if identity in chain:
                target = os.path.realpath(path)
                skipped.append(
                    Skipped(Path(path), f"not followed: a link back to {target}, above it")
                )
                continue
            above[path] = chain | {identity}
            kept.append(name)
        folders[:] = kept  # only these are searched
        yield folder, folders, sorted(name for name in files if not name.startswith("."))


def _identity(path: Path) -> tuple[int, int]:
    """A folder's (device, inode), through links: the same for every path to it."""
    status = path.stat()
    return status.st_dev, status.st_ino


def read_cohort_table(path: Path) -> dict[str, str]:
    """``subject_id`` -> ``cohort`` from a CSV file with those two columns."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(
            f"cohort table {path} cannot be read ({exc}); give a UTF-8 CSV file with columns "
            "subject_id and cohort"
        ) from None
    if not rows or not {"subject_id", "cohort"} <= set(rows[0]):
        raise ManifestError(
            f"cohort table {path} needs the columns subject_id and cohort and one row per subject"
        )
    table: dict[str, str] = {}
    for number, row in enumerate(rows, start=1):
        sid, cohort = (row.get("subject_id") or "").strip(), (row.get("cohort") or "").strip()
        if not sid or not cohort:
            raise ManifestError(f"cohort table {path}, row {number}: a blank subject_id or cohort")
        if table.get(sid, cohort) != cohort:
            raise ManifestError(
                f"cohort table {path}: subject {sid!r} is in cohorts {table[sid]!r} and "
                f"{cohort!r}; keep one row per subject"
            )
        table[sid] = cohort
    return table


def find_layout(
    root: Path,
    image: str | None,
    mask: str,
    *,
    cohort: str | None = None,
    cohort_table: Mapping[str, str] | None = None,
    match_by_uid: bool = False,
) -> Layout:
    """Subjects under ``root`` by the ``image`` and ``mask`` patterns, or, with
    ``match_by_uid`` (and no ``image``), by the series each segmentation references.

    The cohort comes from a ``{cohort}`` field, or ``cohort`` (one name for
    all), or ``cohort_table`` (subject id -> cohort), at most one of them;
    without any it is ``all``. Raises :class:`ManifestError` when nothing
    matches, when a subject matches a pattern twice, or when the cohorts
    disagree or are missing from the table. Symlinked folders are searched;
    folders that could not be read, and links that would loop, are in
    :attr:`Layout.skipped`.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"root folder {root} does not exist or is not a folder")
    if match_by_uid == (image is not None):
        raise ConfigError(
            "give --image PATTERN, or --match-by-uid to pair each segmentation with the image "
            "series it references (one of them)"
        )
    image_regex = compile_pattern(image, "--image") if image is not None else None
    mask_regex = compile_pattern(mask, "--mask")
    from_path = "cohort" in mask_regex.groupindex or (
        image_regex is not None and "cohort" in image_regex.groupindex
    )
    sources = [from_path, cohort is not None, cohort_table is not None]
    if sum(sources) > 1:
        raise ConfigError(
            "the cohort can come from a {cohort} field in the patterns, from --cohort or from "
            "--cohort-table; give one of them"
        )
    found_masks, skipped = _matches(root, mask_regex)
    series: dict[str, str] = {}
    notes: list[str] = []
    if image_regex is None:
        found_masks = [f for f in found_masks if _is_segmentation(f.path)]
        masks = _by_subject(found_masks, "--mask", mask, root)
        images, series, notes = _by_uid(root, masks)
    else:
        found_images, _ = _matches(root, image_regex)  # the same folders, skipped the same way
        images = _by_subject(found_images, "--image", str(image), root)
        masks = _by_subject(found_masks, "--mask", mask, root)
    if not images and image_regex is not None:
        unread = [f"{s.path} {s.reason}" for s in skipped if s.unreadable]
        raise ManifestError(
            f"no file or folder under {root} matches --image {image!r}; check the pattern "
            "(it is relative to the root folder, e.g. '{subject}/ct.nii.gz')"
            + (f"; these folders could not be read: {'; '.join(unread[:5])}" if unread else "")
        )
    if not masks and image_regex is None:
        raise ManifestError(
            f"no DICOM SEG or RTSTRUCT under {root} matches --mask {mask!r}; check the pattern "
            "(it is relative to the root folder, e.g. '{subject}/seg.dcm')"
        )
    subjects: list[Subject] = []
    missing: list[str] = []
    for sid in sorted(images.keys() & masks.keys()):
        found_image, found_mask = images[sid], masks[sid]
        named = {f.cohort for f in (found_image, found_mask) if f.cohort is not None}
        if len(named) > 1:
            raise ManifestError(
                f"subject {sid!r} is in cohort {found_image.cohort!r} by its image "
                f"{found_image.path} and {found_mask.cohort!r} by its mask {found_mask.path}; "
                "make the patterns agree"
            )
        group = named.pop() if named else cohort
        if cohort_table is not None:
            group = cohort_table.get(sid)
            if group is None:
                missing.append(sid)
                continue
        subjects.append(
            Subject(
                sid, found_image.path, found_mask.path, group or DEFAULT_COHORT, None, 0,
                series.get(sid),
            )
        )  # fmt: skip
    if missing:
        raise ManifestError(
            f"the cohort table has no row for {len(missing)} subject(s) found under {root}: "
            f"{', '.join(missing[:20])}{', ...' if len(missing) > 20 else ''}; add them"
        )
    numbered = tuple(
        Subject(s.subject_id, s.image, s.mask, s.cohort, None, n, s.series_uid)
        for n, s in enumerate(subjects, start=1)
    )
    return Layout(
        numbered,
        tuple(images[sid] for sid in sorted(images.keys() - masks.keys())),
        tuple(masks[sid] for sid in sorted(masks.keys() - images.keys())),
        tuple(notes),
        tuple(skipped),
    )


def _is_segmentation(path: Path) -> bool:
    """Whether a path is a DICOM SEG or RTSTRUCT file, or a folder holding one."""
    try:
        return find_dicom_mask(path) is not None
    except InputError:  # another DICOM object, or several segmentations: not a mask
        return False


def _by_uid(
    root: Path, masks: Mapping[str, Found]
) -> tuple[dict[str, Found], dict[str, str], list[str]]:
    """The image series folder and SeriesInstanceUID each segmentation references, from
    every DICOM image file under ``root``; and a note per segmentation left unmatched."""
    folders: dict[str, set[Path]] = {}
    # the folders the mask pattern's search skipped, skipped the same way (not listed twice)
    for folder, _, files in _walk(root, []):
        for name in files:
            path = Path(folder) / name
            if not is_dicom_file(path):
                continue
            try:
                found = dicom_object(path)
            except InputError:
                continue  # unreadable: not an image this manifest can use
            if found.kind == "image" and found.series_uid:
                folders.setdefault(found.series_uid, set()).add(path.parent)
    images: dict[str, Found] = {}
    series: dict[str, str] = {}
    notes: list[str] = []
    for sid, mask in masks.items():
        found_mask = find_dicom_mask(mask.path)
        named = found_mask.referenced_series if found_mask is not None else ()
        uids = [uid for uid in named if uid in folders]
        if not uids:
            notes.append(
                f"{mask.path} (subject {sid}) references series "
                f"{', '.join(named) or '(none named)'}, which no DICOM image under {root} is"
            )
            continue
        places = sorted(folders[uids[0]])
        if len(places) > 1:
            raise ManifestError(
                f"series {uids[0]}, which {mask.path} references, has files in "
                f"{len(places)} folders ({', '.join(str(p) for p in places[:5])}); a series is "
                "read from one folder: move its files together"
            )
        images[sid] = Found(places[0], sid, mask.cohort)
        series[sid] = uids[0]
    return images, series, notes


def _by_subject(found: list[Found], option: str, pattern: str, root: Path) -> dict[str, Found]:
    out: dict[str, Found] = {}
    for item in found:
        if item.subject in out:
            raise ManifestError(
                f"{option} {pattern!r} matches two paths for subject {item.subject!r}: "
                f"{out[item.subject].path.relative_to(root)} and {item.path.relative_to(root)}; "
                "make the pattern more specific"
            )
        out[item.subject] = item
    return out
