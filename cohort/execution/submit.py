"""Jobs on a Ray cluster: what ``cohort submit``, ``status``, ``logs`` and ``stop`` do.

A job script (``jobs/analyze.py``) is sent to the cluster's Jobs API with
:class:`ray.job_submission.JobSubmissionClient`. The ``runtime_env`` ships the
script's folder as the working directory and this package as a ``py_module``,
so the cluster runs the same code as the submitting machine.

Authentication is on by default: the Ray auth token is sent as a bearer token
on every request. It is looked up, first found wins, in ``--token-file``,
``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH`` and
``~/.ray/auth_token`` (Ray's own order, after the explicit option). A plain
HTTP address that is not loopback is refused without a token unless
``--insecure`` is given: an unauthenticated Jobs API runs any command it is
sent (ShadowRay, CVE-2023-48022).

The click commands are in :mod:`cohort.cli.cluster`; this module has no
click: messages go through the ``say`` callables it is given, and errors are
:class:`~cohort.errors.CohortError` subclasses with their exit status.
"""

from __future__ import annotations

import asyncio
import datetime
import getpass
import hashlib
import ipaddress
import os
import shlex
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cohort import __version__
from cohort.errors import ClusterError, ConfigError, CredentialsError, ExitCode

if TYPE_CHECKING:
    from ray.job_submission import JobInfo, JobStatus, JobSubmissionClient

__all__ = [
    "HOW_TO_TOKEN",
    "MODE_ENV",
    "POLL_S",
    "RUN_ID_KEY",
    "SHADOWRAY",
    "TOKEN_ENV",
    "TOKEN_PATH_ENV",
    "Address",
    "Connection",
    "JobSpec",
    "Say",
    "Token",
    "auth_mode",
    "call",
    "check_transport",
    "connect",
    "exit_code_of",
    "find_token",
    "follow_job",
    "is_terminal",
    "job_spec",
    "outcome",
    "package_dir",
    "parse_address",
    "previous_attempts",
    "run_id_for",
    "status_lines",
    "stop_job",
    "stream_logs",
    "submission_id_for",
    "submit_job",
    "wait_terminal",
]

Say = Callable[[str], None]  # prints one message for the user (stderr on the command line)

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
MODE_ENV = "RAY_AUTH_MODE"
RUN_ID_KEY = "cohort_run_id"  # job metadata key of the logical run id
POLL_S = 1.0

HOW_TO_TOKEN = (
    "Provide the cluster's token in one of these ways (first found wins): "
    "--token-file PATH; RAY_AUTH_TOKEN=<token>; RAY_AUTH_TOKEN_PATH=PATH; or the file "
    "~/.ray/auth_token. Print it on the head node with `ray get-auth-token`; on KubeRay "
    "read the cluster's Secret (kubectl get secret <raycluster-name> -o "
    "jsonpath='{.data.auth_token}' | base64 -d)."
)

SHADOWRAY = (
    "The Ray Jobs API executes any command it is sent. Without a token anyone who can "
    "reach {address} can run code on the cluster and read its data: this is how "
    "ShadowRay (CVE-2023-48022) compromised thousands of clusters. Start the cluster "
    "with RAY_AUTH_MODE=token (cluster.yaml and k8s/rayjob.yaml do) and give cohort its "
    "token, or reach the dashboard through a tunnel on loopback "
    "(`ray dashboard cluster.yaml`, `kubectl port-forward`). Pass --insecure only for a "
    "cluster on a network you trust completely."
)


# ------------------------------------------------------------ pure helpers


@dataclass(frozen=True)
class Token:
    """A Ray auth token and where it was found (for messages; never the value)."""

    value: str
    source: str


def _read_token(path: Path, what: str) -> str:
    try:
        value = path.expanduser().read_text().strip()
    except OSError as err:
        raise CredentialsError(
            f"cannot read the Ray auth token from {path} ({what}): {err.strerror}; "
            f"fix the path or unset it. {HOW_TO_TOKEN}"
        ) from None
    if not value:
        raise CredentialsError(f"the token file {path} ({what}) is empty. {HOW_TO_TOKEN}")
    return value


def find_token(token_file: Path | None, environ: Mapping[str, str], home: Path) -> Token | None:
    """The token to send: --token-file, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if token_file is not None:
        return Token(_read_token(token_file, "--token-file"), f"--token-file {token_file}")
    if environ.get(TOKEN_ENV, "").strip():
        return Token(environ[TOKEN_ENV].strip(), TOKEN_ENV)
    if environ.get(TOKEN_PATH_ENV, "").strip():
        path = Path(environ[TOKEN_PATH_ENV])
        return Token(_read_token(path, TOKEN_PATH_ENV), f"{TOKEN_PATH_ENV}={path}")
    default = home / ".ray" / "auth_token"
    if default.is_file():
        return Token(_read_token(default, "the default token path"), str(default))
    return None


def auth_mode(environ: Mapping[str, str]) -> str:
    """``token`` (default) or ``disabled``, from RAY_AUTH_MODE."""
    mode = environ.get(MODE_ENV, "token").strip().lower() or "token"
    if mode not in ("token", "disabled"):
        raise ConfigError(
            f"RAY_AUTH_MODE={environ[MODE_ENV]!r} is not a Ray auth mode; use token or disabled"
        )
    return mode


@dataclass(frozen=True)
class Address:
    """A Jobs API (dashboard) address."""

    url: str  # scheme://host:port, no trailing slash
    scheme: str
    host: str

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_address(text: str) -> Address:
    """The dashboard URL of ``text``; ``host:port`` means ``http://host:port``."""
    raw = text.strip().rstrip("/")
    if "://" not in raw:
        raw = f"http://{raw}"
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(
            f"{text!r} is not a Jobs API address: it must be the dashboard's http(s) URL, e.g. "
            "http://127.0.0.1:8265 (ray:// and GCS addresses like head:6379 are for ray.init)"
        )
    try:
        host, _ = parts.hostname, parts.port  # .port raises for a port that is not a number
    except ValueError:
        raise ConfigError(
            f"{text!r} has a bad port; give the dashboard URL, e.g. http://127.0.0.1:8265"
        ) from None
    if not host:
        raise ConfigError(
            f"{text!r} has no host; give the dashboard URL, e.g. http://127.0.0.1:8265"
        )
    return Address(url=raw, scheme=parts.scheme, host=host.lower())


def check_transport(address: Address, token: Token | None, insecure: bool) -> str | None:
    """Refuse a plain-HTTP non-loopback address without a token; returns a warning or None."""
    if address.scheme == "http" and not address.loopback:
        if token is None and not insecure:
            raise CredentialsError(
                f"refusing to submit to {address.url} without a Ray auth token over plain "
                f"HTTP. {SHADOWRAY.format(address=address.url)} {HOW_TO_TOKEN}"
            )
        if token is not None:
            return (
                f"the token travels unencrypted to {address.url}; prefer a tunnel to loopback "
                "(`ray dashboard cluster.yaml`, `kubectl port-forward`) or https"
            )
        return f"submitting to {address.url} without authentication (--insecure)"
    if token is None and address.scheme == "https" and not insecure:
        return f"no Ray auth token found; {address.url} must authenticate requests by itself"
    return None


def run_id_for(script: Path, args: Sequence[str]) -> str:
    """The logical run id: the same job script and arguments give the same id."""
    digest = hashlib.sha256("\0".join([script.name, *args]).encode()).hexdigest()[:12]
    return f"{script.stem}-{digest}"


def submission_id_for(run_id: str) -> str:
    """A fresh submission id for one attempt of ``run_id``."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    return f"cohort-{run_id}-{stamp}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class JobSpec:
    """What is sent to the Jobs API."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    submission_id: str


def package_dir() -> Path:
    """The folder of the ``cohort`` package, shipped as a py_module."""
    return Path(__file__).resolve().parents[1]


def job_spec(
    script: Path,
    args: Sequence[str],
    working_dir: Path | None,
    ship_package: bool,
    run_id: str,
    attempt: int,
) -> JobSpec:
    """Entrypoint, runtime_env and metadata for ``python SCRIPT ARGS`` on the cluster."""
    script = script.resolve()
    if not script.is_file():
        raise ConfigError(f"job script {script} does not exist")
    folder = (working_dir or script.parent).resolve()
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder")
    if not script.is_relative_to(folder):
        raise ConfigError(
            f"job script {script} is not inside the working dir {folder}; the cluster only "
            "sees files under the working dir. Move the script or pick a folder above it"
        )
    relative = script.relative_to(folder).as_posix()
    runtime_env: dict[str, Any] = {
        "working_dir": str(folder),
        "excludes": ["__pycache__", "*.pyc", ".git", ".venv"],
    }
    if ship_package:
        runtime_env["py_modules"] = [str(package_dir())]
    metadata = {
        RUN_ID_KEY: run_id,
        "cohort_attempt": str(attempt),
        "cohort_version": __version__,
        "job_script": relative,
        "submitted_by": _user(),
        "submitted_from": socket.gethostname(),
    }
    return JobSpec(
        entrypoint=shlex.join(["python", relative, *args]),
        runtime_env=runtime_env,
        metadata=metadata,
        submission_id=submission_id_for(run_id),
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# ------------------------------------------------------------- the client


@dataclass(frozen=True)
class Connection:
    """A Jobs API client and what was used to make it (for messages)."""

    client: JobSubmissionClient
    address: Address
    token: Token | None


def connect(
    address_text: str,
    token_file: Path | None,
    insecure: bool,
    say: Say,
    environ: Mapping[str, str] | None = None,
) -> Connection:
    """A client for ``address_text`` that sends the token; refuses insecure setups."""
    from ray.job_submission import JobSubmissionClient

    environ = os.environ if environ is None else environ
    address = parse_address(address_text)
    mode = auth_mode(environ)
    token = find_token(token_file, environ, Path.home()) if mode == "token" else None
    warning = check_transport(address, token, insecure)
    if warning:
        say(f"warning: {warning}")
    headers = {"Authorization": f"Bearer {token.value}"} if token else None
    try:
        client = JobSubmissionClient(address.url, headers=headers)
    except Exception as err:
        raise _explain(err, address, token) from None
    return Connection(client, address, token)


def _explain(
    err: Exception, address: Address, token: Token | None
) -> CredentialsError | ClusterError:
    """A message that says what went wrong with the cluster and what to do next."""
    from ray.exceptions import AuthenticationError

    text = str(err)
    if isinstance(err, AuthenticationError) or "status code 401" in text:
        if token is None or "Authentication required" in text:
            return CredentialsError(
                f"the cluster at {address.url} requires a Ray auth token and none was sent "
                f"(HTTP 401). {HOW_TO_TOKEN}"
            )
        return CredentialsError(
            f"the cluster at {address.url} rejected the token from {token.source} (HTTP 403): "
            f"it is not this cluster's token. {HOW_TO_TOKEN}"
        )
    if isinstance(err, ConnectionError):
        return ClusterError(
            f"cannot reach the Ray Jobs API at {address.url}: {text}. Is the head node up and "
            "its dashboard running? For cluster.yaml run `ray dashboard cluster.yaml` and use "
            "http://127.0.0.1:8265; on Kubernetes `kubectl port-forward svc/<head-svc> 8265`"
        )
    return ClusterError(f"the Ray Jobs API at {address.url} failed: {text}")


def call(connection: Connection, what: Callable[[], Any]) -> Any:
    """Run a Jobs API request; failures become errors that say what to do next."""
    try:
        return what()
    except (CredentialsError, ClusterError):
        raise
    except Exception as err:
        raise _explain(err, connection.address, connection.token) from None


def previous_attempts(connection: Connection, run_id: str) -> int:
    """How many submissions of ``run_id`` the cluster knows of."""
    jobs = call(connection, connection.client.list_jobs)
    return sum(1 for job in jobs if (job.metadata or {}).get(RUN_ID_KEY) == run_id)


def submit_job(connection: Connection, spec: JobSpec, entrypoint_cpus: float | None) -> str:
    """Send ``spec`` to the cluster; returns the job's submission id."""
    if entrypoint_cpus is not None and entrypoint_cpus < 0:
        raise ConfigError(f"--entrypoint-cpus must be 0 or more, got {entrypoint_cpus:g}")
    job_id: str = call(
        connection,
        lambda: connection.client.submit_job(
            entrypoint=spec.entrypoint,
            runtime_env=spec.runtime_env,
            metadata=spec.metadata,
            submission_id=spec.submission_id,
            entrypoint_num_cpus=entrypoint_cpus,
        ),
    )
    return job_id


def is_terminal(status: JobStatus) -> bool:
    return bool(status.is_terminal())


def wait_terminal(connection: Connection, job_id: str, timeout_s: float | None) -> JobStatus:
    """Poll until the job reaches a terminal state (or ``timeout_s`` passes)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = call(connection, lambda: connection.client.get_job_status(job_id))
        if is_terminal(status) or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(POLL_S)


def stream_logs(connection: Connection, job_id: str, echo: Say, say: Say) -> None:
    """Print the job's logs as they come until it ends (websocket; polling if that fails)."""
    shown = 0

    async def tail() -> None:
        nonlocal shown
        async for chunk in connection.client.tail_job_logs(job_id):
            echo(chunk)
            shown += len(chunk)

    try:
        asyncio.run(tail())
        return
    except KeyboardInterrupt:
        raise
    except Exception as err:
        say(f"warning: log streaming failed ({err}); polling the logs instead")
    while True:
        logs: str = call(connection, lambda: connection.client.get_job_logs(job_id))
        if len(logs) > shown:
            echo(logs[shown:])
            shown = len(logs)
        if is_terminal(wait_terminal(connection, job_id, timeout_s=0)):
            logs = call(connection, lambda: connection.client.get_job_logs(job_id))
            echo(logs[shown:])
            return
        time.sleep(POLL_S)


def outcome(connection: Connection, job_id: str, say: Say) -> ExitCode:
    """Say the job's final state and return the exit status for it."""
    from ray.job_submission import JobStatus

    info: JobInfo = call(connection, lambda: connection.client.get_job_info(job_id))
    seconds = (
        f" after {(info.end_time - info.start_time) / 1000:.1f} s"
        if info.end_time and info.start_time
        else ""
    )
    message = f": {info.message}" if info.message and info.status != JobStatus.SUCCEEDED else ""
    say(f"job {job_id} {info.status.value}{seconds}{message}")
    return exit_code_of(info.status.value)


def exit_code_of(status: str) -> ExitCode:
    """FAILURES for a FAILED or STOPPED job, OK otherwise."""
    return ExitCode.FAILURES if status in ("FAILED", "STOPPED") else ExitCode.OK


def follow_job(
    connection: Connection,
    job_id: str,
    *,
    stop_on_interrupt: bool,
    confirm_stop: Callable[[str], bool],
    echo: Say,
    say: Say,
) -> ExitCode:
    """Stream logs until the job ends; on Ctrl-C stop it (if asked or confirmed)."""
    try:
        stream_logs(connection, job_id, echo, say)
        wait_terminal(connection, job_id, timeout_s=None)
    except KeyboardInterrupt:
        say("")
        if not (stop_on_interrupt or confirm_stop(job_id)):
            say(
                f"job {job_id} keeps running; follow it with `cohort logs {job_id} --follow "
                f"--address {connection.address.url}` or stop it with `cohort stop {job_id} "
                f"--address {connection.address.url}`"
            )
            return ExitCode.INTERRUPTED
        say(f"stopping job {job_id}")
        call(connection, lambda: connection.client.stop_job(job_id))
        wait_terminal(connection, job_id, timeout_s=60)
    return outcome(connection, job_id, say)


def status_lines(connection: Connection, job_id: str) -> tuple[list[str], ExitCode]:
    """What ``cohort status`` prints about a job, and the exit status of its state."""
    info: JobInfo = call(connection, lambda: connection.client.get_job_info(job_id))
    metadata = info.metadata or {}
    lines = [f"job: {job_id}", f"status: {info.status.value}"]
    if RUN_ID_KEY in metadata:
        lines.append(f"run: {metadata[RUN_ID_KEY]} (attempt {metadata.get('cohort_attempt', '?')})")
    lines.append(f"entrypoint: {info.entrypoint}")
    for name, stamp in (("started", info.start_time), ("ended", info.end_time)):
        if stamp:
            when = datetime.datetime.fromtimestamp(stamp / 1000, tz=datetime.UTC)
            lines.append(f"{name}: {when.isoformat(timespec='seconds')}")
    if info.message:
        lines.append(f"message: {info.message}")
    return lines, exit_code_of(info.status.value)


def stop_job(connection: Connection, job_id: str, wait_s: float, say: Say) -> None:
    """Stop a job and wait until it has ended."""
    stopped: bool = call(connection, lambda: connection.client.stop_job(job_id))
    if not stopped:
        say(f"job {job_id} had already ended")
    final = wait_terminal(connection, job_id, timeout_s=wait_s)
    if not is_terminal(final):
        raise ClusterError(f"job {job_id} is still {final.value} after {wait_s:g} s; check again")
    outcome(connection, job_id, say)
