"""``cohort submit`` and ``jobs/analyze.py`` against a real Ray head node.

The module fixture starts its own head (``ray start --head --block``) on
loopback with its own temp dir, ports and auth token, and stops exactly that
head at teardown: every process it started carries a marker in its
environment, and teardown checks that none is left. The shared local Ray
instance of the other tests (``ray_session``) is neither used nor touched.
The command line runs in subprocesses, with a HOME of its own, so the
machine's ``~/.ray/auth_token`` plays no part.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from cohort.cli.main import main
from cohort.errors import ConfigError
from cohort.execution import submit
from cohort.outputs import store

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "analyze.py"
RAY_BIN = Path(sys.executable).with_name("ray")
OUTPUTS = store.FINAL_FILES  # every file a finished run publishes
TIMINGS: dict[str, float] = {}


# ------------------------------------------------------------------ the head


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries ``marker`` (everything the head started)."""
    needle = f"COHORT_TEST_HEAD={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@dataclass
class Head:
    url: str
    token: str
    temp_dir: Path
    marker: str
    process: subprocess.Popen[bytes]
    home: Path
    log: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    def cli_env(self, token: str | None) -> dict[str, str]:
        """Environment of a ``cohort`` command: own HOME, token given only if asked."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("RAY_") and k != "COHORT_TEST_HEAD"
        }
        env.update(HOME=str(self.home), RAY_AUTH_MODE="token")
        if token is not None:
            env["RAY_AUTH_TOKEN"] = token
        return env


def _ready(url: str, token: str) -> bool:
    request = urllib.request.Request(
        f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(head: Head) -> None:
    if head.process.poll() is None:
        head.process.send_signal(signal.SIGTERM)  # ray start --block stops what it started
        try:
            head.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            head.process.kill()
            head.process.wait(timeout=10)
    deadline = time.monotonic() + 20  # job watchers notice their supervisor is gone
    while (left := _marked_pids(head.marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_head(request: pytest.FixtureRequest) -> Iterator[Head]:
    temp_dir = Path(tempfile.mkdtemp(prefix="chd-", dir="/tmp"))  # short: unix socket paths
    home = temp_dir / "home"
    home.mkdir()
    token, marker = secrets.token_hex(16), secrets.token_hex(8)
    dashboard = _free_port()
    ports = {
        "--port": _free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": _free_port(),
        "--node-manager-port": _free_port(),
        "--object-manager-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        COHORT_TEST_HEAD=marker,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    command = [
        str(RAY_BIN),
        "start",
        "--head",
        "--block",
        "--temp-dir",
        str(temp_dir),
        "--node-ip-address",
        "127.0.0.1",
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--num-cpus",
        "2",
        "--num-gpus",
        "0",
        "--min-worker-port",
        "0",
        "--max-worker-port",
        "0",
        "--disable-usage-stats",
        *(str(x) for pair in ports.items() for x in pair),
    ]
    log = temp_dir / "head.log"
    started = time.perf_counter()
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = Head(f"http://127.0.0.1:{dashboard}", token, temp_dir, marker, process, home, log)
    try:
        deadline = time.monotonic() + 180
        while not _ready(head.url, token):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                pytest.fail(f"the test head did not come up (exit {process.poll()}):\n{tail}")
            time.sleep(0.5)
        TIMINGS["head start s"] = time.perf_counter() - started
        yield head
    finally:
        stopping = time.perf_counter()
        _stop(head)
        TIMINGS["stop s"] = time.perf_counter() - stopping
        left = _marked_pids(marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
        line = "cluster timings: " + ", ".join(f"{k} {v:.1f}" for k, v in TIMINGS.items())
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if capture is not None:
            with capture.global_and_fixture_disabled():
                print(f"\n{line}")
        assert not left, f"Ray processes of the test head outlived it: {left}"


def _cohort(args: list[str], env: dict[str, str], timeout: float = 280) -> tuple[int, str]:
    """Run the ``cohort`` command line in a subprocess; returns (exit status, output)."""
    command = [sys.executable, "-c", "from cohort.cli.main import main; main()", *args]
    done = subprocess.run(
        command, env=env, cwd=ROOT, timeout=timeout, capture_output=True, text=True, check=False
    )
    return done.returncode, done.stdout + done.stderr


# ------------------------------------------------------- against the live head


def _submit_run(head: Head, manifest: Path, out: Path, *extra: str) -> list[str]:
    """``cohort submit jobs/analyze.py`` of a CPU run with random weights on ``head``."""
    run = ["run", str(manifest), "--out", str(out), "--weights", "random", "--device", "cpu"]
    return ["submit", str(JOB), "--address", head.url, "--", *run, *extra]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_submit_runs_the_analysis_on_the_cluster(
    ray_head: Head, small_cohort: Path, small_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    started = time.perf_counter()
    code, output = _cohort(
        _submit_run(ray_head, small_cohort, out, "--quiet", "--stall-timeout", "240"),
        ray_head.cli_env(ray_head.token),
    )
    TIMINGS["submit-to-done s"] = time.perf_counter() - started
    assert code == 0, output
    assert "SUCCEEDED" in output
    assert "6 done, 0 reused, 0 failed of 6 subjects" in output  # the job's own log lines
    for name in OUTPUTS:
        assert (out / name).is_file(), f"{name} missing; output:\n{output}"
    features = pq.read_table(out / "features.parquet").to_pandas()
    assert features["subject_id"].nunique() == 6
    assert len(features) == 6 * 3 * 3  # subjects x regions x layers
    provenance = json.loads((out / "run.json").read_text())
    assert provenance["counts"] == {"subjects": 6, "done": 6, "cached": 0, "failed": 0}
    # the numbers: the cluster's run equals a local run with the same options, to float32
    # rounding (other processes, other thread counts: 2e-7 seen on components near 0)
    key = ["subject_id", "region", "layer"]
    local = pq.read_table(small_run / "features.parquet").to_pandas().sort_values(key)
    remote = features.sort_values(key)
    assert remote[key].to_numpy().tolist() == local[key].to_numpy().tolist()
    np.testing.assert_allclose(
        np.stack(remote["vector"]), np.stack(local["vector"]), rtol=1e-5, atol=1e-6
    )
    pair = ["subject_id", "layer", "region_a", "region_b"]
    sims = [
        pq.read_table(folder / "similarity.parquet").to_pandas().sort_values(pair)
        for folder in (out, small_run)
    ]
    # centring removes the shared direction, so the rounding of the vectors weighs more
    # in the centred cosines (3e-6 seen between the two processes)
    for column, atol in (("cosine", 1e-6), ("cosine_centred", 1e-5)):
        np.testing.assert_allclose(sims[0][column], sims[1][column], rtol=0, atol=atol)

    job_id = re.search(r"submitted (\S+) \(run (\S+), attempt (\d+)\)", output)
    assert job_id is not None, output
    code, status = _cohort(
        ["status", job_id.group(1), "--address", ray_head.url], ray_head.cli_env(ray_head.token)
    )
    assert code == 0, status
    assert "status: SUCCEEDED" in status
    assert f"run: {job_id.group(2)}" in status


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failing_job_exits_1_with_its_error(ray_head: Head, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-manifest.csv"
    code, output = _cohort(
        _submit_run(ray_head, missing, tmp_path / "out"), ray_head.cli_env(ray_head.token)
    )
    assert code == 1, output
    assert "FAILED" in output
    assert f"manifest {missing} does not exist" in output  # the job's error, streamed back


@pytest.mark.timeout(120)
def test_without_the_token_the_cluster_refuses_and_the_cli_says_how(ray_head: Head) -> None:
    args = ["submit", str(JOB), "--address", ray_head.url, "--", "run", "m.csv", "--out", "o"]
    code, output = _cohort(args, ray_head.cli_env(None))
    assert code == 2, output
    assert "HTTP 401" in output
    for way in ("--token-file", "RAY_AUTH_TOKEN=", "~/.ray/auth_token", "ray get-auth-token"):
        assert way in output
    code, output = _cohort(args, ray_head.cli_env("not-the-token"))
    assert code == 2, output
    assert "rejected the token from RAY_AUTH_TOKEN (HTTP 403)" in output


@pytest.mark.timeout(180)
def test_no_wait_then_status_logs_and_stop(ray_head: Head, tmp_path: Path) -> None:
    script = tmp_path / "sleepy.py"
    script.write_text("import time\nprint('sleeping', flush=True)\ntime.sleep(600)\n")
    env = ray_head.cli_env(ray_head.token)
    address = ["--address", ray_head.url]
    code, output = _cohort(["submit", str(script), *address, "--no-ship-package", "--no-wait"], env)
    assert code == 0, output
    job_id = output.split("submitted ", 1)[1].split()[0]
    deadline = time.monotonic() + 120
    while "sleeping" not in _cohort(["logs", job_id, *address], env)[1]:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(2)
    code, output = _cohort(["stop", job_id, *address], env)
    assert code == 0, output
    assert "STOPPED" in output
    code, output = _cohort(["status", job_id, *address], env)
    assert code == 1
    assert "status: STOPPED" in output


# ------------------------------------------------------------- without a head


@pytest.fixture
def no_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_plain_http_to_a_remote_head_without_token_is_refused(no_token: Path) -> None:
    result = CliRunner().invoke(
        main, ["submit", str(JOB), "--address", "http://10.1.2.3:8265", "--", "run", "m.csv"]
    )
    assert result.exit_code == 2
    assert "CVE-2023-48022" in result.output
    assert "ShadowRay" in result.output
    assert "--insecure" in result.output
    assert "RAY_AUTH_TOKEN" in result.output


def test_token_sources_in_order(tmp_path: Path) -> None:
    explicit, env_file, home = tmp_path / "explicit", tmp_path / "env-file", tmp_path / "home"
    explicit.write_text("from-option\n")
    env_file.write_text("from-path-env")
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-default")
    environ = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(env_file)}
    assert submit.find_token(explicit, environ, home) == submit.Token(
        "from-option", f"--token-file {explicit}"
    )
    assert submit.find_token(None, environ, home).value == "from-env"  # type: ignore[union-attr]
    environ.pop("RAY_AUTH_TOKEN")
    assert submit.find_token(None, environ, home).value == "from-path-env"  # type: ignore[union-attr]
    assert submit.find_token(None, {}, home).value == "from-default"  # type: ignore[union-attr]
    assert submit.find_token(None, {}, tmp_path) is None
    with pytest.raises(submit.CredentialsError, match="cannot read the Ray auth token"):
        submit.find_token(None, {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "gone")}, home)


def test_transport_rules() -> None:
    token = submit.Token("t", "test")
    loopback = submit.parse_address("127.0.0.1:8265")
    assert loopback.url == "http://127.0.0.1:8265"
    assert loopback.loopback
    assert submit.check_transport(loopback, None, insecure=False) is None
    remote = submit.parse_address("http://head.example.org:8265/")
    with pytest.raises(submit.CredentialsError):
        submit.check_transport(remote, None, insecure=False)
    assert "unencrypted" in str(submit.check_transport(remote, token, insecure=False))
    assert "--insecure" in str(submit.check_transport(remote, None, insecure=True))
    assert submit.check_transport(submit.parse_address("https://h:443"), token, False) is None
    with pytest.raises(ConfigError, match="dashboard"):
        submit.parse_address("ray://head:10001")


def test_job_spec_ships_script_and_package(tmp_path: Path) -> None:
    args = ["run", "m.csv", "--out", "s3://b/r"]
    run_id = submit.run_id_for(JOB, args)
    assert run_id == submit.run_id_for(JOB, list(args))
    assert run_id != submit.run_id_for(JOB, [*args, "--quiet"])
    spec = submit.job_spec(JOB, args, None, ship_package=True, run_id=run_id, attempt=2)
    assert spec.entrypoint == "python analyze.py run m.csv --out s3://b/r"
    assert spec.runtime_env["working_dir"] == str(JOB.parent)
    assert spec.runtime_env["py_modules"] == [str(ROOT / "cohort")]
    assert spec.metadata["cohort_run_id"] == run_id
    assert spec.metadata["cohort_attempt"] == "2"
    again = submit.job_spec(JOB, args, None, ship_package=False, run_id=run_id, attempt=3)
    assert again.submission_id != spec.submission_id
    assert "py_modules" not in again.runtime_env
    whole = submit.job_spec(JOB, args, ROOT, ship_package=False, run_id=run_id, attempt=1)
    assert whole.entrypoint.startswith("python jobs/analyze.py ")
    with pytest.raises(ConfigError, match="not inside the working dir"):
        submit.job_spec(JOB, args, tmp_path, ship_package=True, run_id=run_id, attempt=1)


def _analyze() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cohort_job_analyze", JOB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_uploads_results_to_a_uri_and_needs_a_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    analyze = _analyze()
    results = tmp_path / "results"
    (results / ".cohort" / "parts").mkdir(parents=True)
    (results / ".cohort" / "parts" / "p.parquet").write_bytes(b"state")
    (results / "features.parquet").write_bytes(b"x" * 10)
    (results / "sub").mkdir()
    (results / "sub" / "a.csv").write_text("a")
    target = f"file://{tmp_path / 'remote' / 'run-1'}"
    assert analyze.is_uri(target)
    assert not analyze.is_uri(str(results))
    filesystem, path = analyze.open_output(target)
    assert analyze.upload(results, filesystem, path) == ["features.parquet", "sub/a.csv"]
    assert (tmp_path / "remote" / "run-1" / "features.parquet").read_bytes() == b"x" * 10
    assert not (tmp_path / "remote" / "run-1" / ".cohort").exists()
    with pytest.raises(analyze.click.BadParameter, match="cannot open"):
        analyze.open_output("nosuchscheme://bucket/x")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(analyze.click.UsageError, match="RAY_ADDRESS"):
        analyze.require_cluster(None)
    analyze.require_cluster("127.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    analyze.require_cluster(None, "auto")
    with pytest.raises(analyze.click.UsageError, match="--executor in-process"):
        analyze.require_cluster(None, "in-process")


# --------------------------------------------------------- cluster configs


def _pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for requirement in project["dependencies"]:
        name = re.split(r"[\[=<>! ]", requirement, maxsplit=1)[0]
        pins[name] = requirement
    return pins


def _ray_image() -> str:
    version = _pins()["ray"].split("==")[1]
    python = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["python_version"]
    return f"rayproject/ray:{version}-py{python.replace('.', '')}-gpu"


def test_ray_image_tag_follows_pyproject() -> None:
    assert _ray_image() == "rayproject/ray:2.60.0-py311-gpu"


def test_cluster_yaml() -> None:
    config: dict[str, Any] = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for key in (
        "cluster_name",
        "max_workers",
        "provider",
        "docker",
        "available_node_types",
        "head_node_type",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
        "file_mounts",
    ):
        assert key in config, f"cluster.yaml lacks {key}"
    assert config["docker"]["image"] == _ray_image()
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    gpu_types = [
        t
        for name, t in types.items()
        if name != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1
    ]
    assert gpu_types, "cluster.yaml has no GPU worker type"
    assert all(t["max_workers"] > t["min_workers"] for t in gpu_types)  # autoscaling
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--num-cpus=0" in head_start
    assert "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in config["file_mounts"].values()
    assert any("pip install" in c for c in config["setup_commands"])


def test_rayjob_yaml() -> None:
    job: dict[str, Any] = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert "analyze.py run" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _pins()["ray"].split("==")[1]
    assert cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    gpu_groups = [
        g
        for g in cluster["workerGroupSpecs"]
        if any(
            "nvidia.com/gpu" in c["resources"]["limits"]
            for c in g["template"]["spec"]["containers"]
        )
    ]
    assert gpu_groups, "k8s/rayjob.yaml has no GPU worker group"
    assert all(g["maxReplicas"] > g["minReplicas"] for g in gpu_groups)
    pods = [head["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            assert container["image"] == _ray_image()
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("RAY_AUTH_MODE") == "token", container["name"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    pinned = set(runtime_env["pip"]["packages"])
    for name, requirement in _pins().items():
        if name != "ray":
            assert requirement in pinned, f"{requirement} of pyproject.toml not in the RayJob"
