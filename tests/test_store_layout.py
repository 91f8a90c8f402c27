"""Per-subject parts are sharded into 256 folders and the flat layout is still read.

A 100,000-subject run must not leave 100,000 files in one folder (slow on
Lustre, NFS and GPFS): ``.cohort/parts/<2 hex>/<key>.parquet``. Parts a
previous version left flat in ``.cohort/parts/`` are reused, and temporary
files of dead runs are cleaned in every shard while a live run's are kept.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cohort.inputs.fingerprint import subject_key
from cohort.outputs import store

pytestmark = pytest.mark.timeout(120)

SCHEMA = pa.schema(
    [("subject_id", pa.string()), ("cohort", pa.string()), ("value", pa.float64())],
    metadata={b"cohort.provenance": b"{}"},
)


def _key(index: int) -> str:
    return subject_key(f"sub-{index:06d}", f"print-{index}")


def _part(index: int, cohort: str = "old") -> pa.Table:
    return pa.table(
        {
            "subject_id": [f"sub-{index:06d}"] * 2,
            "cohort": [cohort] * 2,
            "value": [float(index), float(index) + 0.5],
        },
        schema=pa.schema(list(SCHEMA)),
    )


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def pids() -> Iterator[tuple[int, int]]:
    """A pid that is no longer a process and one of a live process."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "120"])
    try:
        yield dead.pid, live.pid
    finally:
        live.kill()
        live.wait()


def test_parts_land_in_at_most_256_shard_folders(tmp_path: Path) -> None:
    parts = store.Parts(tmp_path)
    keys = [_key(i) for i in range(3000)]
    for index, key in enumerate(keys):
        parts.write(key, _part(index))

    folders = sorted(p for p in parts.root.iterdir())
    assert all(p.is_dir() and re.fullmatch(r"[0-9a-f]{2}", p.name) for p in folders), folders
    assert 200 < len(folders) <= 256  # 3,000 keys spread over (nearly) every shard
    assert not list(parts.root.glob("*.parquet")), "a part was written flat in parts/"
    for key in keys:
        shard = hashlib.sha256(key.encode()).hexdigest()[:2]
        assert parts.path(key) == parts.root / shard / f"{key}.parquet"
        assert parts.path(key).is_file()
    assert max(len(list(p.iterdir())) for p in folders) < 40  # ~12 per folder here
    assert len(_files(parts.root)) == len(keys)


def test_keys_has_path_and_combine_round_trip(tmp_path: Path) -> None:
    parts = store.Parts(tmp_path)
    keys = [_key(i) for i in range(40)]
    assert parts.keys() == set()
    assert not parts.has(keys[0])
    for index, key in enumerate(keys):
        parts.write(key, _part(index))

    assert parts.keys() == set(keys)
    assert all(parts.has(key) for key in keys)
    assert not parts.has(_key(999))
    order = keys[::-1]
    out = tmp_path / "features.parquet"
    rows = parts.combine(order, SCHEMA, out, cohorts=[f"c{i % 3}" for i in range(len(order))])
    got = pq.read_table(out)
    assert rows == got.num_rows == 2 * len(keys)
    assert got.column("subject_id").to_pylist()[::2] == [f"sub-{i:06d}" for i in range(39, -1, -1)]
    assert got.column("cohort").to_pylist()[::2] == [f"c{i % 3}" for i in range(len(order))]
    assert got.column("value").to_pylist()[:2] == [39.0, 39.5]
    assert got.schema.metadata == SCHEMA.metadata


def test_flat_parts_of_an_earlier_version_are_found_and_combined(tmp_path: Path) -> None:
    parts = store.Parts(tmp_path)
    parts.root.mkdir(parents=True)
    flat = [_key(i) for i in range(5)]
    for index, key in enumerate(flat):  # the layout before shards
        pq.write_table(_part(index), parts.root / f"{key}.parquet")
    sharded = [_key(i) for i in range(5, 10)]
    for index, key in enumerate(sharded, start=5):
        parts.write(key, _part(index))

    assert parts.keys() == set(flat) | set(sharded)
    for key in flat:
        assert parts.has(key)
        assert parts.path(key) == parts.root / f"{key}.parquet"
    out = tmp_path / "features.parquet"
    assert parts.combine(flat + sharded, SCHEMA, out) == 20
    values = pq.read_table(out).column("value").to_pylist()[::2]
    assert values == [float(i) for i in range(10)]

    # a rewrite goes to the shard, which then wins over the flat file
    parts.write(flat[0], _part(100))
    assert parts.path(flat[0]).parent.name == store.Parts.shard(flat[0])
    assert pq.read_table(parts.path(flat[0])).column("value")[0].as_py() == 100.0
    assert parts.keys() == set(flat) | set(sharded)


def test_a_file_in_another_keys_shard_or_a_temporary_file_is_not_a_part(tmp_path: Path) -> None:
    parts = store.Parts(tmp_path)
    key, other = _key(1), _key(2)
    parts.write(key, _part(1))
    wrong = next(f"{i:02x}" for i in range(256) if f"{i:02x}" != store.Parts.shard(other))
    (parts.root / wrong).mkdir(exist_ok=True)
    pq.write_table(_part(2), parts.root / wrong / f"{other}.parquet")
    (parts.root / store.Parts.shard(key) / f".{other}.parquet.tmp-1").write_bytes(b"half")
    (parts.root / "notes").mkdir()
    pq.write_table(_part(3), parts.root / "notes" / f"{_key(3)}.parquet")

    assert parts.keys() == {key}
    assert not parts.has(other)


def test_clean_removes_dead_runs_temporary_files_in_every_shard_and_keeps_live_ones(
    tmp_path: Path, pids: tuple[int, int]
) -> None:
    dead, live = pids
    parts = store.Parts(tmp_path)
    assert parts.clean() == []  # no parts folder yet
    keys = [_key(i) for i in range(6)]
    for index, key in enumerate(keys):
        parts.write(key, _part(index))
    shards = sorted({parts.path(k).parent for k in keys})
    assert len(shards) >= 2
    dead_files, live_files = [], []
    for folder in [parts.root, *shards]:
        dead_files.append(folder / f".{_key(50)}.parquet.tmp-{dead}")
        live_files.append(folder / f".{_key(51)}.parquet.tmp-{live}")
    for path in dead_files + live_files:
        path.write_bytes(b"half a parquet file")

    assert parts.keys() == set(keys)  # temporary files are not parts
    removed = parts.clean()

    assert sorted(removed) == sorted(dead_files)
    assert not any(p.exists() for p in dead_files), "a dead run's temporary file was left"
    for path in live_files:
        assert path.read_bytes() == b"half a parquet file", "a live run's file was touched"
    assert parts.keys() == set(keys)
    assert all(parts.path(k).is_file() for k in keys)


def test_writing_leaves_no_temporary_file(tmp_path: Path) -> None:
    parts = store.Parts(tmp_path)
    for index in range(20):
        parts.write(_key(index), _part(index))
    assert not [p for p in _files(parts.root) if ".tmp-" in p.name]
    assert parts.clean() == []


def test_combine_writes_few_row_groups_not_one_per_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # one row group per part gave features.parquet 5,000 groups at 5,000 subjects:
    # a 4.4 MB footer, and reading it took 1.2 s and 240 MiB instead of 0.03 s and 70
    parts = store.Parts(tmp_path)
    keys = [_key(i) for i in range(300)]
    for index, key in enumerate(keys):
        parts.write(key, _part(index))
    out = tmp_path / "features.parquet"
    assert parts.combine(keys, SCHEMA, out) == 600
    assert pq.ParquetFile(out).metadata.num_row_groups == 1
    whole = pq.read_table(out)

    size = _part(0).nbytes
    monkeypatch.setattr(store, "ROW_GROUP_BYTES", 100 * size)  # about 100 parts a group
    small = tmp_path / "small.parquet"
    assert parts.combine(keys, SCHEMA, small) == 600
    assert 3 <= pq.ParquetFile(small).metadata.num_row_groups <= 4
    assert pq.read_table(small).equals(whole)
    assert whole.column("value").to_pylist()[::2] == [float(i) for i in range(300)]
    assert whole.schema.metadata == SCHEMA.metadata

    empty = tmp_path / "empty.parquet"
    assert parts.combine([], SCHEMA, empty) == 0
    assert pq.read_table(empty).num_rows == 0
    assert pq.read_table(empty).schema.equals(SCHEMA, check_metadata=True)
