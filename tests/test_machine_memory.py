"""An in-process run sizes a subject against this machine's memory, not --actor-memory:
the cgroup limit or MemAvailable, whichever is lower, less what the process holds."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from cohort.cli.main import main
from cohort.config import ExecutionConfig, RunConfig
from cohort.errors import GeometryError
from cohort.execution import machine
from cohort.execution.machine import HostMemory, in_process_budget, read_host_memory
from cohort.inputs.manifest import read_manifest, write_manifest
from cohort.model.memory import (
    GIB,
    WORKER_BASE_BYTES,
    actor_budget,
    check_memory,
    estimate_peak_bytes,
)
from cohort.synthetic import make_phantom_cohort

pytestmark = pytest.mark.timeout(60)

MIB = 2**20
LAYERS = ("conv-1", "conv-3", "conv-5")
WHOLE_BODY = (648, 512, 512)  # the CT: 512 x 512 x 648 at 0.7 x 0.7 x 1 mm
SPACING = (1.0, 0.7, 0.7)


def fake_root(tmp_path: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


MEMINFO = "MemTotal:       24683664 kB\nMemFree:         1000000 kB\nMemAvailable:   19879664 kB\n"
STATUS = "Name:\tpython\nVmPeak:\t 3000000 kB\nVmRSS:\t  819200 kB\nThreads:\t4\n"


def test_cgroup_v2_the_lowest_limit_on_the_path_holds(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path,
        {
            "proc/meminfo": MEMINFO,
            "proc/self/status": STATUS,
            "proc/self/cgroup": "0::/user.slice/job.scope\n",
            "sys/fs/cgroup/user.slice/job.scope/memory.max": "max\n",
            "sys/fs/cgroup/user.slice/memory.max": f"{6 * GIB}\n",
            "sys/fs/cgroup/memory.max": f"{8 * GIB}\n",
        },
    )
    host = read_host_memory(root)
    assert host == HostMemory(
        available=19879664 * 1024,
        cgroup_limit=6 * GIB,
        cgroup_file="/sys/fs/cgroup/user.slice/memory.max",
        rss=800 * MIB,
    )


def test_cgroup_v1_limit_and_its_no_limit_value(tmp_path: Path) -> None:
    files = {
        "proc/meminfo": MEMINFO,
        "proc/self/status": STATUS,
        "proc/self/cgroup": "5:devices:/\n4:memory:/docker/abc\n3:cpu,cpuacct:/\n0::/\n",
        "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": f"{4 * GIB}\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",  # no limit
    }
    host = read_host_memory(fake_root(tmp_path / "limited", files))
    assert host.cgroup_limit == 4 * GIB
    assert host.cgroup_file == "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes"
    files["sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes"] = "9223372036854771712\n"
    host = read_host_memory(fake_root(tmp_path / "unlimited", files))
    assert (host.cgroup_limit, host.cgroup_file) == (None, "")
    assert host.available == 19879664 * 1024 and host.rss == 800 * MIB


def test_nothing_to_read_gives_nothing(tmp_path: Path) -> None:
    assert read_host_memory(tmp_path) == HostMemory(None, None, "", None)


def test_this_machine_is_read() -> None:
    if not Path("/proc/meminfo").is_file():
        pytest.skip("no /proc/meminfo: not Linux")
    host = read_host_memory()
    total = int(re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
    assert host.available is not None and 0 < host.available <= total * 1024
    assert host.rss is not None and 10 * MIB < host.rss < total * 1024


def test_the_lower_of_the_cgroup_less_the_process_and_mem_available() -> None:
    cfg = RunConfig()
    cgroup_lower = HostMemory(10 * GIB, 4 * GIB, "/sys/fs/cgroup/memory.max", GIB)
    budget = in_process_budget(cgroup_lower, cfg)
    assert (budget.bytes, budget.reserved, budget.in_process) == (3 * GIB, 0, True)
    assert "the cgroup's memory limit 4.00 GB (/sys/fs/cgroup/memory.max)" in budget.source
    assert "less the 1.00 GB this process holds" in budget.source
    machine_lower = HostMemory(2 * GIB, 4 * GIB, "/sys/fs/cgroup/memory.max", GIB)
    budget = in_process_budget(machine_lower, cfg)
    assert budget.bytes == 2 * GIB  # MemAvailable already leaves out this process
    assert "MemAvailable" in budget.source
    no_cgroup = HostMemory(5 * GIB, None, "", GIB)
    assert in_process_budget(no_cgroup, cfg).bytes == 5 * GIB
    # nothing readable: --actor-memory as on Ray, and said so
    fallback = in_process_budget(HostMemory(None, None, "", None), cfg)
    assert fallback.bytes == actor_budget(cfg).bytes == 3 * GIB - WORKER_BASE_BYTES
    assert "cannot be read" in fallback.source


def test_the_whole_body_ct_fits_a_24_gb_machine_in_process() -> None:
    """The issue's case: refused by the default --actor-memory, fits the machine."""
    cfg = RunConfig(execution=ExecutionConfig(device="cpu"))
    with pytest.raises(GeometryError, match="each actor has"):
        check_memory(WHOLE_BODY, SPACING, cfg, LAYERS, "cpu", "ct.nii.gz")
    # a 24 GB machine (the issue's) with 19 GB available and a 0.8 GB process
    roomy = in_process_budget(HostMemory(19 * GIB, None, "", 800 * MIB), cfg)
    check_memory(WHOLE_BODY, SPACING, cfg, LAYERS, "cpu", "ct.nii.gz", budget=roomy)


def test_a_subject_over_the_machine_is_refused_with_its_numbers() -> None:
    cfg = RunConfig(execution=ExecutionConfig(device="cpu"))
    host = HostMemory(2 * GIB, 8 * GIB, "/sys/fs/cgroup/memory.max", GIB)
    est = estimate_peak_bytes(WHOLE_BODY, "densenet121", LAYERS)
    budget = in_process_budget(host, cfg)
    with pytest.raises(GeometryError) as caught:
        check_memory(WHOLE_BODY, SPACING, cfg, LAYERS, "cpu", "ct.nii.gz", budget=budget)
    message = str(caught.value)
    need = float(re.search(r"needs an estimated ([\d.]+) GB in this process", message).group(1))  # type: ignore[union-attr]
    assert need == pytest.approx(est.host / GIB, abs=0.01)  # no worker process added
    assert "more than the 2.00 GB it has: this machine's available memory (MemAvailable" in message
    assert "each actor has" not in message
    assert "--executor ray --actor-memory 3.5" in message  # what an actor would need
    for fix in ("--spacing", "--crop-margin", "--device cuda"):
        assert fix in message


@pytest.mark.timeout(300)
def test_in_process_run_checks_the_machine_not_the_actor_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--actor-memory 0.8 leaves an actor 0.05 GB, too little for either subject; this
    process (a machine with 0.1 GB available, faked) holds the small one, not the large."""
    small, large = (64, 64, 64), (96, 128, 128)
    need = [estimate_peak_bytes(s, "densenet121", LAYERS).host / GIB for s in (small, large)]
    assert (
        need[0] < 0.1 < need[1]
        and actor_budget(RunConfig(execution=ExecutionConfig(actor_memory_gb=0.8))).bytes / GIB
        < need[0]
    )
    subjects = []
    for name, shape in (("small", small), ("large", large)):
        made = make_phantom_cohort(tmp_path / name, n_per_cohort=1, cohorts=(name,), shape=shape)
        subjects.extend(read_manifest(made))
    rows = [dataclasses.replace(s, row=i + 1) for i, s in enumerate(subjects)]
    manifest = write_manifest(rows, tmp_path / "manifest.csv")
    monkeypatch.setattr(machine, "read_host_memory", lambda: HostMemory(GIB // 10, None, "", 0))
    out = tmp_path / "out"
    args = ["run", str(manifest), "--out", str(out), "--executor", "in-process", "--quiet"]
    args += ["--device", "cpu", "--weights", "random", "--actor-memory", "0.8", "--no-report"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    errors = pd.read_csv(out / "errors.csv")
    assert list(errors["subject_id"]) == ["large-01"]
    assert list(errors["stage"]) == ["check"]
    assert "in this process" in errors["message"][0]
    assert "more than the 0.10 GB it has: this machine's available memory" in errors["message"][0]
    done = pd.read_parquet(out / "features.parquet")
    assert set(done["subject_id"]) == {"small-01"}
