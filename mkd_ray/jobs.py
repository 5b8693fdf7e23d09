"""Ray Jobs at the edge: ship the project to a cluster, run any run.py command there, follow it.

`submit` wraps JobSubmissionClient: the working directory travels as the job's runtime
environment (without data, venvs, MLflow stores or checkpoints), the job's logs stream
here until it ends, and the exit code follows its status. Ctrl-C stops following, not the
job. Token authentication (Ray's default) is switched on here whenever a token is at hand.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# Never uploaded: datasets, environments, MLflow stores, checkpoints and caches.
EXCLUDES = [".venv/", "venv/", ".git/", "data/", "runs/", "mlruns/", "mlartifacts/", "compare/", "mlflow.db",
            "__pycache__/", ".pytest_cache/", "*.egg-info/", "*.pt", "*.parquet"]
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
FOLLOW_INTERRUPTED = 130


class JobsError(RuntimeError):
    """The job server cannot be reached, refuses our credentials, or does not know the job."""


@dataclass
class Submission:
    command: list[str]  # the run.py command and its arguments
    working_dir: str = "."
    env: dict[str, str] = field(default_factory=dict)
    pip: list[str] = field(default_factory=list)
    num_cpus: float = 0.0
    num_gpus: float = 0.0

    def entrypoint(self) -> str:
        return shlex.join(["python", "run.py", *self.command])

    def runtime_env(self) -> dict:
        env = dict(self.env)
        if "MLFLOW_TRACKING_URI" not in env and os.environ.get("MLFLOW_TRACKING_URI"):
            env["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]  # every node logs to the same store
        runtime_env = {"working_dir": str(Path(self.working_dir).resolve()), "excludes": EXCLUDES, "env_vars": env}
        if self.pip:
            runtime_env["pip"] = self.pip
        return runtime_env


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise JobsError(f"--env expects KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def _use_token_if_available() -> None:
    """Ray clusters started by `ray start` require a token; send one when we have it (a
    cluster without authentication ignores it). Sources, as Ray reads them: RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or Path(path).is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def connect(address: str):
    """A JobSubmissionClient for `address` (http://HEAD:8265), with errors that say what to fix."""
    _use_token_if_available()
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as exc:
        first = str(exc).splitlines()[0]
        raise JobsError(f"{address} refused the credentials ({first}); give the cluster's token as RAY_AUTH_TOKEN "
                        "or in a file named by RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token)") from None
    except (ConnectionError, ValueError) as exc:
        raise JobsError(f"cannot reach a Ray job server at {address}: {exc} Check the address (the head's "
                        "dashboard, e.g. http://HEAD:8265) and that the head runs with the dashboard") from None


def submit(client, submission: Submission) -> str:
    return client.submit_job(
        entrypoint=submission.entrypoint(), runtime_env=submission.runtime_env(),
        entrypoint_num_cpus=submission.num_cpus or None, entrypoint_num_gpus=submission.num_gpus or None,
        metadata={"tool": "mkd_ray", "command": " ".join(submission.command[:1])},
    )


def follow(client, job_id: str, address: str, out=sys.stdout) -> int:
    """Stream the job's logs until it ends; the exit code follows its status. Ctrl-C leaves it running."""
    try:
        asyncio.run(_stream_logs(client, job_id, out))
        status = _wait_for_end(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running.\n"
              f"  follow: python run.py jobs logs {job_id} --follow --address {address}\n"
              f"  stop:   python run.py jobs stop {job_id} --address {address}", file=sys.stderr)
        return FOLLOW_INTERRUPTED
    info = client.get_job_info(job_id)
    print(f"job {job_id} {status}" + (f": {info.message}" if status != "SUCCEEDED" and info.message else ""),
          file=sys.stderr)
    return EXIT_CODES.get(status, 1)


async def _stream_logs(client, job_id: str, out) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def _wait_for_end(client, job_id: str, poll_s: float = 1.0) -> str:
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in EXIT_CODES:
            return status
        time.sleep(poll_s)


def list_jobs(client) -> list[dict]:
    rows = []
    for job in client.list_jobs():
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        rows.append({"id": job.submission_id or job.job_id, "status": str(job.status.value), "started": started,
                     "entrypoint": job.entrypoint})
    return sorted(rows, key=lambda r: r["started"])


def job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        raise JobsError(f"no job {job_id!r} on this cluster ({str(exc).splitlines()[0]}); see `run.py jobs list`") from None


def stop(client, job_id: str) -> Optional[bool]:
    job_info(client, job_id)  # a clear error for an unknown id
    return client.stop_job(job_id)
