"""``cohort submit``, ``status``, ``logs`` and ``stop``: jobs on a Ray cluster.

Thin click shells over :mod:`cohort.execution.submit`. Exit status: 0 the job
SUCCEEDED; 1 it FAILED or was STOPPED; 2 unusable invocation, address or
credentials; 130 interrupted while the job keeps running.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from cohort.cli.common import reported
from cohort.cli.options import apply

__all__ = ["logs", "status", "stop", "submit"]

F = TypeVar("F", bound=Callable[..., Any])


def _say(text: str) -> None:
    click.echo(text, err=True)


def _echo(chunk: str) -> None:
    click.echo(chunk, nl=False)


def _confirm_stop(job_id: str) -> bool:
    if not sys.stdin.isatty():
        return False
    try:
        return click.confirm(f"stop job {job_id} on the cluster?", default=False, err=True)
    except click.Abort:
        return False


CONNECTION_OPTIONS: list[Callable[[F], F]] = [
    click.option(
        "--address",
        required=True,
        envvar="RAY_API_SERVER_ADDRESS",
        show_envvar=True,
        help="The cluster's Jobs API (dashboard) URL, e.g. http://127.0.0.1:8265.",
    ),
    click.option(
        "--token-file",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="File holding the Ray auth token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, "
        "~/.ray/auth_token).",
    ),
    click.option(
        "--insecure",
        is_flag=True,
        help="Allow a plain-HTTP, non-loopback address without a token (ShadowRay risk).",
    ),
]


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("job_script", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@apply(CONNECTION_OPTIONS)
@click.option(
    "--working-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder shipped as the job's working dir (default: the job script's folder).",
)
@click.option(
    "--ship-package/--no-ship-package",
    default=True,
    show_default=True,
    help="Ship this cohort package with the job (off: use the one installed on the cluster).",
)
@click.option("--run-id", default=None, help="Logical run id (default: from script and ARGS).")
@click.option("--no-wait", is_flag=True, help="Print the submission id and return.")
@click.option("--stop-on-interrupt", is_flag=True, help="Ctrl-C stops the job without asking.")
@click.option(
    "--entrypoint-cpus",
    type=float,
    default=None,
    help="CPUs reserved for the job's driver (default: none, it runs on the head).",
)
def submit(
    job_script: Path,
    args: tuple[str, ...],
    address: str,
    token_file: Path | None,
    insecure: bool,
    working_dir: Path | None,
    ship_package: bool,
    run_id: str | None,
    no_wait: bool,
    stop_on_interrupt: bool,
    entrypoint_cpus: float | None,
) -> None:
    """Run JOB_SCRIPT with ARGS on a Ray cluster and stream its logs.

    \b
    cohort submit jobs/analyze.py --address http://127.0.0.1:8265 -- \\
        run /data/manifest.csv --out s3://bucket/results --device cuda
    """
    from cohort.execution import submit as jobs

    with reported():
        connection = jobs.connect(address, token_file, insecure, _say)
        run_id = run_id or jobs.run_id_for(job_script, args)
        attempt = jobs.previous_attempts(connection, run_id) + 1
        spec = jobs.job_spec(job_script, args, working_dir, ship_package, run_id, attempt)
        job_id = jobs.submit_job(connection, spec, entrypoint_cpus)
        _say(f"submitted {job_id} (run {run_id}, attempt {attempt}) to {connection.address.url}")
        if no_wait:
            click.echo(job_id)
            _say(
                f"follow it with `cohort logs {job_id} --follow --address {connection.address.url}`"
            )
            return
        code = jobs.follow_job(
            connection,
            job_id,
            stop_on_interrupt=stop_on_interrupt,
            confirm_stop=_confirm_stop,
            echo=_echo,
            say=_say,
        )
    sys.exit(code)


@click.command()
@click.argument("job_id")
@apply(CONNECTION_OPTIONS)
def status(job_id: str, address: str, token_file: Path | None, insecure: bool) -> None:
    """Print the state of job JOB_ID; exit 1 if it FAILED or was STOPPED."""
    from cohort.execution import submit as jobs

    with reported():
        lines, code = jobs.status_lines(jobs.connect(address, token_file, insecure, _say), job_id)
    for line in lines:
        click.echo(line)
    sys.exit(code)


@click.command()
@click.argument("job_id")
@apply(CONNECTION_OPTIONS)
@click.option("--follow", is_flag=True, help="Keep streaming until the job ends.")
def logs(job_id: str, address: str, token_file: Path | None, insecure: bool, follow: bool) -> None:
    """Print the logs of job JOB_ID (with --follow: until it ends, exit by its outcome)."""
    from cohort.execution import submit as jobs

    with reported():
        connection = jobs.connect(address, token_file, insecure, _say)
        if follow:
            jobs.stream_logs(connection, job_id, _echo, _say)
            jobs.wait_terminal(connection, job_id, timeout_s=None)
            sys.exit(jobs.outcome(connection, job_id, _say))
        text: str = jobs.call(connection, lambda: connection.client.get_job_logs(job_id))
    click.echo(text, nl=False)


@click.command()
@click.argument("job_id")
@apply(CONNECTION_OPTIONS)
@click.option("--wait-s", default=60.0, show_default=True, help="How long to wait for the stop.")
def stop(job_id: str, address: str, token_file: Path | None, insecure: bool, wait_s: float) -> None:
    """Stop job JOB_ID and wait until it has ended."""
    from cohort.execution import submit as jobs

    with reported():
        jobs.stop_job(jobs.connect(address, token_file, insecure, _say), job_id, wait_s, _say)
