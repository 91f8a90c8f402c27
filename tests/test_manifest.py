"""Manifest reading: columns, paths, ids as text, and every error naming its row."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cohort.errors import ManifestError
from cohort.inputs.manifest import Subject, read_manifest, write_manifest


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def good_csv(tmp_path: Path) -> Path:
    return write_csv(
        tmp_path / "manifest.csv",
        "subject_id,image,mask,cohort,labels\n"
        "007,img/007.nii.gz,seg/007.nii.gz,control,\n"
        '12,/abs/12.nii.gz,/abs/12_seg.nii.gz,,"tibia=2,femur=1"\n',
    )


def test_csv_rows_ids_paths_cohorts_and_labels(good_csv: Path) -> None:
    subjects = read_manifest(good_csv)
    folder = good_csv.parent
    assert subjects == (
        Subject("007", folder / "img/007.nii.gz", folder / "seg/007.nii.gz", "control", None, 1),
        Subject(
            "12",
            Path("/abs/12.nii.gz"),
            Path("/abs/12_seg.nii.gz"),
            "all",
            (("tibia", 2), ("femur", 1)),
            2,
        ),
    )


def test_relative_paths_resolve_against_manifest_folder_not_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = tmp_path / "study"
    sub.mkdir()
    manifest = write_csv(sub / "m.csv", "subject_id,image,mask\na,../data/a.nii,a_seg.nii\n")
    monkeypatch.chdir(tmp_path)
    (subject,) = read_manifest(Path("study/m.csv"))
    assert subject.image == sub / "../data/a.nii"
    assert subject.mask == sub / "a_seg.nii"
    assert subject.image.is_absolute()
    assert manifest.exists()


def test_optional_columns_absent_give_defaults(tmp_path: Path) -> None:
    manifest = write_csv(tmp_path / "m.csv", "image,mask,subject_id\nx.nii,y.nii,001\n")
    (subject,) = read_manifest(manifest)
    assert (subject.subject_id, subject.cohort, subject.labels, subject.row) == (
        "001",
        "all",
        None,
        1,
    )


def test_parquet_reads_like_csv_and_keeps_string_ids(tmp_path: Path) -> None:
    table = pa.table(
        {
            "subject_id": ["007", "010"],
            "image": ["a.nii", "b.nii"],
            "mask": ["a_seg.nii", "b_seg.nii"],
            "cohort": ["osteo", None],
            "labels": [None, "tibia=2,femur=1"],
        }
    )
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    subjects = read_manifest(path)
    assert [s.subject_id for s in subjects] == ["007", "010"]
    assert [s.cohort for s in subjects] == ["osteo", "all"]
    assert [s.labels for s in subjects] == [None, (("tibia", 2), ("femur", 1))]
    assert subjects[1].image == tmp_path / "b.nii"


def test_parquet_integer_ids_become_text(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"subject_id": [7], "image": ["a.nii"], "mask": ["b.nii"]}), path)
    assert read_manifest(path)[0].subject_id == "7"


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    subjects = (
        Subject("001", tmp_path / "images/001.nii.gz", tmp_path / "masks/001.nii.gz", "a", None, 1),
        Subject(
            "002",
            Path("/elsewhere/002.nii.gz"),
            tmp_path / "masks/002.nii.gz",
            "b",
            (("femur", 1), ("tibia", 2)),
            2,
        ),
    )
    path = write_manifest(subjects, tmp_path / "manifest.csv")
    text = path.read_text(encoding="utf-8")
    assert "images/001.nii.gz" in text
    assert str(tmp_path) not in text.split("\n")[1]
    assert "/elsewhere/002.nii.gz" in text
    assert read_manifest(path) == subjects


def test_bare_names_series_uid_and_folders_read_and_round_trip(tmp_path: Path) -> None:
    """A DICOM folder with a series_uid, a mask folder named by bare names, a .seg.nrrd."""
    manifest = write_csv(
        tmp_path / "m.csv",
        "subject_id,image,mask,labels,series_uid\n"
        'a,dicom/a,masks/a,"liver,marrow spot",1.2.3\n'
        "b,b.nrrd,b.seg.nrrd,,\n"
        "c,dicom/c,c.nii.gz,,<empty>\n",
    )
    a, b, c = read_manifest(manifest)
    assert (a.image, a.mask) == (tmp_path / "dicom/a", tmp_path / "masks/a")
    assert a.labels == (("liver", None), ("marrow spot", None))
    assert (a.series_uid, b.series_uid, c.series_uid) == ("1.2.3", None, "<empty>")
    again = write_manifest((a, b, c), tmp_path / "again.csv")
    assert read_manifest(again) == (a, b, c)
    header = again.read_text(encoding="utf-8").splitlines()[0]
    assert header == "subject_id,image,mask,cohort,labels,series_uid"


def test_series_uid_column_is_written_only_when_used(tmp_path: Path) -> None:
    one = Subject("001", tmp_path / "i.nii", tmp_path / "m.nii", "a", None, 1)
    path = write_manifest([one], tmp_path / "m.csv")
    assert path.read_text(encoding="utf-8").splitlines()[0] == "subject_id,image,mask,cohort"


# ---- errors: each names the file, the row where there is one, and the fix ----


def test_missing_manifest_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(ManifestError, match=r"nope\.csv does not exist"):
        read_manifest(path)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.tsv", "subject_id\timage\tmask\n")
    with pytest.raises(ManifestError, match=r"m\.tsv.*\.csv or \.parquet"):
        read_manifest(path)


def test_empty_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "")
    with pytest.raises(ManifestError, match=r"m\.csv is empty"):
        read_manifest(path)


def test_header_without_rows(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "subject_id,image,mask\n\n")
    with pytest.raises(ManifestError, match=r"m\.csv has a header but no subject rows"):
        read_manifest(path)


def test_missing_required_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "subject_id,image\na,b\n")
    with pytest.raises(ManifestError, match=r"m\.csv: missing required column\(s\) mask"):
        read_manifest(path)


def test_unknown_column_lists_allowed(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "subject_id,image,mask,Group\na,b,c,d\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    message = str(info.value)
    assert "m.csv" in message
    assert "'Group'" in message
    assert "subject_id, image, mask, cohort, labels, series_uid" in message


def test_repeated_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "subject_id,image,mask,mask\na,b,c,d\n")
    with pytest.raises(ManifestError, match=r"column\(s\) mask appear more than once"):
        read_manifest(path)


def test_duplicate_subject_names_both_rows(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "m.csv",
        "subject_id,image,mask\ns1,a,b\ns2,c,d\ns1,e,f\n",
    )
    with pytest.raises(ManifestError, match=r"m\.csv: subject_id 's1' appears in row 1 .*row 3"):
        read_manifest(path)


@pytest.mark.parametrize("column", ["subject_id", "image", "mask"])
def test_blank_required_cell_names_row_and_column(tmp_path: Path, column: str) -> None:
    cells = {"subject_id": "s2", "image": "c.nii", "mask": "d.nii"}
    cells[column] = "  "
    row2 = ",".join(cells[c] for c in ("subject_id", "image", "mask"))
    path = write_csv(tmp_path / "m.csv", f"subject_id,image,mask\ns1,a.nii,b.nii\n{row2}\n")
    with pytest.raises(ManifestError, match=rf"m\.csv, row 2: column '{column}' is blank"):
        read_manifest(path)


def test_short_row_is_a_blank_cell(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "subject_id,image,mask\ns1,a.nii\n")
    with pytest.raises(ManifestError, match=r"row 1: column 'mask' is blank"):
        read_manifest(path)


def test_too_many_cells(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "subject_id,image,mask\ns1,a,b\ns2,c,d,e\n")
    with pytest.raises(ManifestError, match=r"row 2: 4 cells but the header has 3"):
        read_manifest(path)


@pytest.mark.parametrize(
    "labels", ["tibia=1,femur", "tibia=one", "tibia=1,femur=1", "background=3", "1tibia"]
)
def test_bad_label_map_names_row(tmp_path: Path, labels: str) -> None:
    path = write_csv(
        tmp_path / "m.csv",
        f'subject_id,image,mask,labels\ns1,a,b,\ns2,c,d,"{labels}"\n',
    )
    with pytest.raises(ManifestError, match=r"m\.csv, row 2 \(subject 's2'\): labels"):
        read_manifest(path)


def test_blank_line_counts_toward_row_numbers(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "subject_id,image,mask\ns1,a,b\n\ns3,,c\n")
    with pytest.raises(ManifestError, match=r"row 3: column 'image' is blank"):
        read_manifest(path)


def test_parquet_blank_required_cell(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    pq.write_table(
        pa.table({"subject_id": ["a", "b"], "image": ["x", None], "mask": ["y", "z"]}), path
    )
    with pytest.raises(ManifestError, match=r"m\.parquet, row 2: column 'image' is blank"):
        read_manifest(path)


def test_not_a_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    path.write_bytes(b"subject_id,image,mask\n")
    with pytest.raises(ManifestError, match=r"m\.parquet cannot be read as Parquet"):
        read_manifest(path)
