"""Ray job entrypoint: the ``cohort run`` analysis on the cluster this job runs on.

::

    cohort submit jobs/analyze.py --address http://127.0.0.1:8265 -- \\
        run /data/manifest.csv --out s3://bucket/run-1 --device cuda

The arguments after ``--`` are a ``cohort run`` command line: the same
options, from the same definitions (:data:`cohort.options.RUN_OPTIONS`), and
the same driver (:func:`cohort.cli.execute`). Two things differ:

* ``--out`` may be a local folder on the cluster or any URI pyarrow opens
  (``s3://``, ``gs://``, ``hdfs://``, ``abfs://``, ``file://``). For a URI the
  run writes into a local temporary folder, which is uploaded when the run
  has finished (partial results of a run with failed subjects included).
* The job joins the Ray cluster it runs on (``RAY_ADDRESS``, which the Jobs
  API sets, or ``--address``) and refuses to start a private Ray instance.

Exit status: that of ``cohort run`` (0 done, 1 failures recorded, 2 unusable
invocation), or 1 when the upload fails.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from cohort.cli import options
from cohort.cli.run import execute
from cohort.errors import ExitCode
from cohort.outputs.store import STATE_DIR


def is_uri(out: str) -> bool:
    """True for ``scheme://...`` (a pyarrow filesystem URI), False for a local path."""
    return "://" in out and bool(urlsplit(out).scheme)


def open_output(out: str) -> tuple[Any, str]:
    """The pyarrow filesystem and path of an output URI; BadParameter when unusable."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        filesystem, path = pafs.FileSystem.from_uri(out)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as err:
        raise click.BadParameter(
            f"cannot open {out!r} as an output location: {err}. Give a folder on the cluster "
            "or a URI pyarrow supports (s3://, gs://, hdfs://, abfs://, file://) with "
            "credentials available on the cluster",
            param_hint="--out",
        ) from None
    return filesystem, path


def upload(folder: Path, filesystem: Any, path: str) -> list[str]:
    """Copy every output file under ``folder`` to ``path`` on ``filesystem``.

    The resume state (``.cohort/``) stays behind; returns the uploaded names.
    """
    filesystem.create_dir(path, recursive=True)
    names = []
    for source in sorted(folder.rglob("*")):
        relative = source.relative_to(folder)
        if not source.is_file() or relative.parts[0] == STATE_DIR:
            continue
        target = f"{path.rstrip('/')}/{relative.as_posix()}"
        if len(relative.parts) > 1:
            filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with source.open("rb") as reader, filesystem.open_output_stream(target) as writer:
            while chunk := reader.read(1 << 22):
                writer.write(chunk)
        names.append(relative.as_posix())
    return names


def require_cluster(address: str | None, executor: str = "auto") -> None:
    """Refuse to run outside a cluster: the job must not start a private Ray instance,
    nor run in its own process (``--executor in-process``) beside the cluster's workers.

    The pipeline then joins the cluster (``ray.init`` reads ``RAY_ADDRESS``, which
    the Jobs API sets, or uses ``--address``), after the manifest and weights
    were checked, so a bad invocation fails fast.
    """
    if executor == "in-process":
        raise click.UsageError(
            "jobs/analyze.py runs the cohort on the Ray cluster's workers; --executor "
            "in-process would run it in the job's own process instead. Drop --executor "
            "(or use `cohort run --executor in-process` on one machine)"
        )
    if not (address or os.environ.get("RAY_ADDRESS")):
        raise click.UsageError(
            "jobs/analyze.py joins the Ray cluster it runs on, but RAY_ADDRESS is not set and "
            "no --address was given. Submit it with `cohort submit jobs/analyze.py --address "
            "URL -- run ...` (the Jobs API sets RAY_ADDRESS), pass --address, or use "
            "`cohort run` on one machine"
        )


@click.group()
def job() -> None:
    """Ray job entrypoint of cohort; takes a `cohort run` command line."""


@job.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option(
    "--out",
    required=True,
    help="Output folder on the cluster, or a pyarrow filesystem URI (s3://bucket/run).",
)
@options.apply(options.RUN_OPTIONS)
def run(manifest: Path, out: str, **values: Any) -> None:
    """Extract region features for every subject in MANIFEST and test them."""
    cfg = options.run_config(values)
    target = open_output(out) if is_uri(out) else None
    require_cluster(cfg.execution.address, cfg.execution.executor)
    if target is None:
        sys.exit(execute(manifest, Path(out), cfg))
    filesystem, path = target
    with tempfile.TemporaryDirectory(prefix="cohort-job-") as scratch:
        code = execute(manifest, Path(scratch), cfg)
        try:
            names = upload(Path(scratch), filesystem, path)
        except OSError as err:
            click.echo(
                f"error: the run finished but uploading its results to {out} failed: {err}; "
                "check the cluster's credentials for that location and rerun",
                err=True,
            )
            sys.exit(ExitCode.FAILURES)
    click.echo(f"uploaded {len(names)} files to {out}")
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run the job with ``argv`` (default: the process's); returns the exit status."""
    try:
        job.main(args=argv, prog_name="jobs/analyze.py", standalone_mode=True)
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            return done.code or 0
        return int(ExitCode.UNUSABLE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
