"""Loaders beside their GPU: on two raylets, each with an actor, every prepared subject
is consumed on the node that made it (cohort.execution.placement; the run itself in
tests/locality_run.py, a process of its own)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from cohort.synthetic import make_phantom_cohort
from tests.processes import cluster_script


@pytest.mark.timeout(600)
def test_prepared_subjects_are_consumed_on_the_node_that_made_them(
    ray_session: None, tmp_path: Path
) -> None:
    manifest = make_phantom_cohort(tmp_path, n_per_cohort=6, shape=(48, 64, 64), seed=5)
    report = cluster_script("locality_run.py", "LOCALITY", str(manifest))
    rows, nodes = report["rows"], report["gpu_nodes"]
    print({"loaded": Counter(r["loaded_on"][:6] for r in rows)})
    assert len(nodes) == 2 and len(rows) == 12
    assert all(r["status"] == "done" for r in rows), [r["message"] for r in rows]
    # each actor's node made subjects and consumed them (the pool used both nodes) ...
    assert {r["consumed_on"] for r in rows} == set(nodes)
    assert {r["loaded_on"] for r in rows} == set(nodes)
    # ... and no subject crossed to the other node
    crossed = [(r["subject_id"], r["loaded_on"][:6], r["consumed_on"][:6]) for r in rows]
    assert [c for c in crossed if c[1] != c[2]] == []
