"""``gaisnet submit``: a run as a Ray Job on an existing cluster (the Jobs API on the dashboard).

The resolved config travels as the job's ``working_dir`` (a folder holding just ``config.yaml``);
the entrypoint is ``gaisnet run config.yaml --no-progress --out RUN_DIR``. Inside a job Ray sets
``RAY_ADDRESS`` to the cluster, so that ``gaisnet run`` joins it (cluster mode, with the resource
check) rather than starting a local Ray. ``gaisnet`` must be installed on the cluster's nodes.

The run folder is written by the job's driver (on the head node) and by the cloud actor (on its
node): ``RUN_DIR`` is an absolute path that must mean the same shared storage on both. A relative
``--out`` (or ``run.out_dir``, or the default runs/<timestamp>) is made absolute against the
submitting machine's current directory; that is right when the cluster shares that filesystem
(for a remote cluster pass ``--out /shared/...``).
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

from ..config import Config, config_to_yaml
from ..layout import CONFIG_NAME
from ..runfolder import RunFolderError, resolve_run_dir

DEFAULT_JOBS_ADDRESS = "http://127.0.0.1:8265"


class SubmitError(RuntimeError):
    """The Jobs API could not be reached or refused the job; nothing runs on the cluster."""


def jobs_address(address: str | None = None) -> str:
    """``address``, else ``RAY_ADDRESS``, else the local dashboard (http://127.0.0.1:8265)."""
    return (address or os.environ.get("RAY_ADDRESS") or DEFAULT_JOBS_ADDRESS).strip()


def entrypoint(run_dir: Path, check_resources: bool = True) -> str:
    cmd = f"gaisnet run {CONFIG_NAME} --no-progress --out {shlex.quote(str(run_dir))}"
    return cmd + ("" if check_resources else " --no-resource-check")


def submit_run(cfg: Config, out: str | Path | None = None, address: str | None = None, wait: bool = True,
               check_resources: bool = True, poll_s: float = 1.0, stream: TextIO | None = None) -> int:
    """Submit ``cfg`` as a Ray Job; with ``wait``, print its logs as they come until it ends.

    Returns the exit code for the CLI: 0 submitted (``wait=False``) or SUCCEEDED; 1 the job ended
    FAILED or STOPPED. Raises ``RunFolderError`` (the run folder is visibly taken) or ``SubmitError``
    before anything is submitted.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    stream = stream or sys.stdout
    run_dir = resolve_run_dir(cfg, out).absolute()  # refuses a taken folder when it is visible here
    addr = jobs_address(address)
    try:
        client = JobSubmissionClient(addr)
    except Exception as e:  # ConnectionError, AuthenticationError, a bad address: all say what is wrong
        raise SubmitError(f"no Ray Jobs API at {addr}: {e}") from None
    with tempfile.TemporaryDirectory(prefix="gaisnet-submit-") as tmp:
        (Path(tmp) / CONFIG_NAME).write_text(config_to_yaml(cfg))
        try:
            job_id = client.submit_job(
                entrypoint=entrypoint(run_dir, check_resources),
                runtime_env={"working_dir": tmp},
                metadata={"gaisnet_run_dir": str(run_dir)},
            )
        except Exception as e:
            raise SubmitError(f"the Ray Jobs API at {addr} refused the job: {e}") from None
    print(f"submitted job {job_id} to {addr}; run folder (on the cluster): {run_dir}", file=stream, flush=True)
    if not wait:
        print(f"follow it with: ray job logs --follow --address {addr} {job_id}", file=stream, flush=True)
        return 0
    try:
        status = _follow(client, job_id, poll_s, stream)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running on the cluster "
              f"(ray job stop --address {addr} {job_id} stops it)", file=sys.stderr, flush=True)
        raise
    info = client.get_job_info(job_id)
    print(f"job {job_id} {status.value}" + (f": {info.message}" if info.message and status != JobStatus.SUCCEEDED
                                            else ""), file=stream, flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def _follow(client, job_id: str, poll_s: float, stream: TextIO):
    """Print the job's log as it grows (polling ``get_job_logs``) until the job ends; its final status."""
    shown = 0
    while True:
        status = client.get_job_status(job_id)  # read before the logs, so the last read has everything
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            stream.write(logs[shown:])
            stream.flush()
            shown = len(logs)
        if status.is_terminal():
            return status
        time.sleep(poll_s)


__all__ = ["DEFAULT_JOBS_ADDRESS", "RunFolderError", "SubmitError", "entrypoint", "jobs_address", "submit_run"]
