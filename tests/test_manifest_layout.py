"""`cohort manifest`: a manifest from a folder layout, unmatched files listed."""

from __future__ import annotations

import csv
import errno
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cohort.cli.main import main
from cohort.errors import ConfigError
from cohort.inputs.layout import compile_pattern, find_layout
from cohort.inputs.manifest import read_manifest

pytestmark = pytest.mark.timeout(60)


def touch(root: Path, listing: str) -> None:
    """Create the files (with one byte) and folders (ending in ``/``) that ``listing``
    names, one a line; ``#`` starts a comment."""
    for line in listing.splitlines():
        relative = line.split("#", 1)[0].strip()
        if not relative:
            continue
        path = root / relative
        if relative.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Two cohorts as folders; s03 has no mask, s09's mask has no image; a DICOM folder."""
    root = tmp_path / "study"
    touch(
        root,
        """
        control/s01/ct.nii.gz
        control/s01/seg.nii.gz
        control/s02/ct.nii.gz
        control/s02/seg.nii.gz
        control/s03/ct.nii.gz  # no mask
        osteo/s04/ct.nii.gz
        osteo/s04/seg.nii.gz
        osteo/s04/notes.txt
        osteo/s09/seg.nii.gz  # no image
        .hidden/s05/ct.nii.gz
        """,
    )
    return root


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_manifest_from_cohort_folders_lists_unmatched(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "manifest.csv"
    result = CliRunner().invoke(
        main,
        [
            "manifest",
            str(tree),
            "--image",
            "{cohort}/{subject}/ct.nii.gz",
            "--mask",
            "{cohort}/{subject}/seg.nii.gz",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 1, result.output
    assert read_rows(out) == [
        {"subject_id": sid, "image": f"study/{c}/{sid}/ct.nii.gz",
         "mask": f"study/{c}/{sid}/seg.nii.gz", "cohort": c}
        for sid, c in (("s01", "control"), ("s02", "control"), ("s04", "osteo"))
    ]  # fmt: skip
    assert f"image without mask: {tree / 'control/s03/ct.nii.gz'} (subject s03)" in result.output
    assert f"mask without image: {tree / 'osteo/s09/seg.nii.gz'} (subject s09)" in result.output
    assert "3 subjects (control, osteo)" in result.output and "2 unmatched" in result.output
    subjects = read_manifest(out)  # readable by the pipeline, paths resolved
    assert subjects[2].image == tree / "osteo/s04/ct.nii.gz"


def test_flat_layout_with_globs_folders_and_a_cohort_table(tmp_path: Path) -> None:
    root = tmp_path / "data"
    touch(
        root,
        """
        images/case_001_0000.nii.gz
        images/case_002_0000.nii.gz
        dicom/case_003/  # a DICOM series folder as the image
        dicom/case_003/IM0001
        labels/case_001.nii.gz
        labels/case_002.nii.gz
        masks/case_003/  # a mask folder
        masks/case_003/liver.nii.gz
        """,
    )
    table = tmp_path / "groups.csv"
    table.write_text("subject_id,cohort\ncase_001,a\ncase_002,b\n", encoding="utf-8")
    layout = find_layout(root, "images/{subject}_*.nii.gz", "labels/{subject}.nii.gz",
                         cohort_table={"case_001": "a", "case_002": "b"})  # fmt: skip
    assert [(s.subject_id, s.cohort, s.row) for s in layout.subjects] == [
        ("case_001", "a", 1),
        ("case_002", "b", 2),
    ]
    assert layout.unmatched == 0
    out = tmp_path / "m.csv"
    result = CliRunner().invoke(
        main,
        ["manifest", str(root), "--image", "dicom/{subject}", "--mask", "masks/{subject}",
         "--cohort", "pilot", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert read_rows(out) == [
        {"subject_id": "case_003", "image": "data/dicom/case_003", "mask": "data/masks/case_003",
         "cohort": "pilot"}
    ]  # fmt: skip
    result = CliRunner().invoke(
        main,
        ["manifest", str(root), "--image", "images/{subject}_0000.nii.gz", "--mask",
         "labels/{subject}.nii.gz", "--cohort-table", str(table), "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [r["cohort"] for r in read_rows(out)] == ["a", "b"]


def test_pattern_errors_name_the_fix(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no \{subject\} field"):
        compile_pattern("ct.nii.gz", "--image")
    with pytest.raises(ConfigError, match=r"has the field \{patient\}"):
        compile_pattern("{patient}/ct.nii.gz", "--image")
    regex = compile_pattern("{subject}/{subject}_ct.nii", "--image")
    assert regex.fullmatch("a/a_ct.nii") and not regex.fullmatch("a/b_ct.nii")
    deep = compile_pattern("**/{subject}.nii.gz", "--image")
    assert [m.group("subject") for m in map(deep.fullmatch, ["x.nii.gz", "a/b/y.nii.gz"]) if m] == [
        "x",
        "y",
    ]
    assert not deep.fullmatch("a/b/y.nii")
    result = CliRunner().invoke(
        main,
        ["manifest", str(tree), "--image", "{cohort}/{subject}/*.nii.gz", "--mask",
         "{cohort}/{subject}/seg.nii.gz", "--out", str(tmp_path / "m.csv")],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "matches two paths for subject 's01'" in result.output
    result = CliRunner().invoke(
        main,
        ["manifest", str(tree), "--image", "{subject}/ct.nii.gz", "--mask", "{subject}/seg.nii",
         "--out", str(tmp_path / "m.csv")],
    )  # fmt: skip
    assert result.exit_code == 2 and "no file or folder under" in result.output
    assert not (tmp_path / "m.csv").exists()


# ------------------------------------------------ links, loops, unreadable folders


def subject_folders(root: Path, names: list[str]) -> None:
    touch(root, "\n".join(f"{n}/ct.nii.gz\n{n}/seg.nii.gz" for n in names))


def ids_and_paths(root: Path, image: str, mask: str) -> list[tuple[str, str, str]]:
    layout = find_layout(root, image, mask)
    return [
        (s.subject_id, s.image.relative_to(root).as_posix(), s.mask.relative_to(root).as_posix())
        for s in layout.subjects
    ]


def test_a_farm_of_symlinked_subject_folders_is_found(tmp_path: Path) -> None:
    """Subject folders that are links into an archive give the subjects real folders give."""
    real = tmp_path / "real"
    subject_folders(real, ["s01", "s02", "s03"])
    archive, farm = tmp_path / "archive", tmp_path / "farm"
    subject_folders(archive, ["scan-a", "scan-b", "scan-c"])
    farm.mkdir()
    for sid, target in (("s01", "scan-a"), ("s02", "scan-b"), ("s03", "scan-c")):
        (farm / sid).symlink_to(archive / target, target_is_directory=True)
    pattern = ("{subject}/ct.nii.gz", "{subject}/seg.nii.gz")
    expected = ids_and_paths(real, *pattern)
    assert [sid for sid, _, _ in expected] == ["s01", "s02", "s03"]
    assert ids_and_paths(farm, *pattern) == expected  # the link's path, not the archive's
    out = tmp_path / "manifest.csv"
    result = CliRunner().invoke(
        main,
        ["manifest", str(farm), "--image", pattern[0], "--mask", pattern[1], "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert [row["subject_id"] for row in read_rows(out)] == ["s01", "s02", "s03"]


def test_a_symlink_loop_ends_and_is_named(tmp_path: Path) -> None:
    root = tmp_path / "study"
    subject_folders(root, ["site/s01", "site/s02"])
    (root / "site" / "s01" / "back").symlink_to(root, target_is_directory=True)  # a loop
    (root / "site" / "again").symlink_to(Path("."), target_is_directory=True)  # to itself
    layout = find_layout(root, "**/{subject}/ct.nii.gz", "**/{subject}/seg.nii.gz")
    assert [s.subject_id for s in layout.subjects] == ["s01", "s02"]
    assert layout.unreadable == 0 and layout.unmatched == 0
    assert sorted(s.path.relative_to(root).as_posix() for s in layout.skipped) == [
        "site/again",
        "site/s01/back",
    ]
    assert all(s.reason.startswith("not followed: a link back to") for s in layout.skipped)


def test_an_unreadable_folder_is_named_and_the_rest_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "study"
    subject_folders(root, ["s01", "s02", "s03"])
    locked = root / "s02"
    if os.geteuid() == 0:  # root reads a chmod 000 folder: refuse it the way the kernel would
        scandir = os.scandir

        def refusing(path: Any = ".") -> Any:
            if Path(os.fspath(path)) == locked:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return scandir(path)

        monkeypatch.setattr(os, "scandir", refusing)
    else:
        locked.chmod(0)
    try:
        out = tmp_path / "manifest.csv"
        args = ["--image", "{subject}/ct.nii.gz", "--mask", "{subject}/seg.nii.gz"]
        result = CliRunner().invoke(main, ["manifest", str(root), *args, "--out", str(out)])
    finally:
        locked.chmod(0o755)
    assert result.exit_code == 1, result.output
    assert [row["subject_id"] for row in read_rows(out)] == ["s01", "s03"]
    assert "1 folder(s) could not be read" in result.output
    assert f"folder not searched: {locked} cannot be read (Permission denied)" in result.output
