"""A Ray cluster of several nodes on this one machine, started with `ray start` as an operator
would (for tests and benchmarks of multi-node behaviour). Node i listens on 127.0.0.(i+1):
Ray tells nodes apart by IP, so each gets its own node rank, and everything stays on loopback."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional


@dataclass
class LocalCluster:
    gcs: str  # for --address
    jobs: str  # the job server, for run.py submit / jobs
    env: dict  # environment for processes that use the cluster (venv on PATH, token auth on)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_core(core: Optional[int]):
    """A preexec_fn that pins a node's processes (they inherit it) to one core."""
    return None if core is None else (lambda: os.sched_setaffinity(0, {core}))


def _cluster_token(directory: Path) -> dict:
    """Token authentication with a token of this cluster's own, for every node and client.
    `ray start --head` turns authentication on only where a token already exists (in 2.60),
    so a fresh machine would start an open cluster; the user's ~/.ray/auth_token is left alone."""
    path = directory / "auth_token"
    path.write_text(secrets.token_hex(16))
    path.chmod(0o600)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


@contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: float = 1, pin_cores: bool = False) -> Iterator[LocalCluster]:
    """Start a head with the job server and `nodes - 1` more nodes; stop them all on exit.

    `pin_cores` puts node i's processes on core i, so that a node of one CPU really has one
    core (Ray's CPU counts are only bookkeeping). `ray stop` on exit ends every Ray process
    of this machine, so use it where no other Ray instance runs."""
    if pin_cores and nodes > len(os.sched_getaffinity(0)):
        raise ValueError(f"cannot pin {nodes} nodes to {len(os.sched_getaffinity(0))} cores")
    cores = sorted(os.sched_getaffinity(0)) if pin_cores else [None] * nodes
    bin_dir = Path(sys.executable).parent
    # One temp dir per node, as on separate machines: nodes that shared one would share the
    # runtime-env cache, and a node unpacking a job's working_dir replaces the directory a
    # process of another node is running in. Short paths: Ray's socket paths have a length limit.
    temp_dirs = [tempfile.mkdtemp(prefix=f"rc{i}", dir="/tmp") for i in range(nodes)]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_TMPDIR": temp_dirs[0],
           **_cluster_token(Path(temp_dirs[0]))}
    for inherited in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(inherited, None)
    port, dashboard = free_port(), free_port()
    start = [str(bin_dir / "ray"), "start", "--num-cpus", f"{cpus_per_node:g}", "--disable-usage-stats"]
    try:
        subprocess.run([*start, "--head", "--port", str(port), "--node-ip-address", "127.0.0.1", "--include-dashboard=true",
                        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--temp-dir", temp_dirs[0]],
                       check=True, capture_output=True, env=env, timeout=180, preexec_fn=_on_core(cores[0]))
        for i in range(1, nodes):
            subprocess.run([*start, "--address", f"127.0.0.1:{port}", "--node-ip-address", f"127.0.0.{i + 1}",
                            "--temp-dir", temp_dirs[i]],
                           check=True, capture_output=True, env=env, timeout=180, preexec_fn=_on_core(cores[i]))
        yield LocalCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", env)
    finally:
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], capture_output=True, env=env, timeout=180)
        for directory in temp_dirs:  # sessions' logs and the cluster's token
            shutil.rmtree(directory, ignore_errors=True)


_HOLDER = """
import sys, time, ray
from ray.util.placement_group import placement_group
ray.init(address=sys.argv[1], log_to_driver=False)
group = placement_group([{"CPU": float(sys.argv[2])}])
group.wait(60)
print("held", flush=True)
time.sleep(3600)
"""


@contextmanager
def cpus_held_by_another_driver(cluster: LocalCluster, cpus: float) -> Iterator[None]:
    """A placement group of `cpus` CPUs held by another driver for as long as the block runs:
    another tenant, or a finished run's placement group that Ray has not released yet."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, cluster.gcs, str(cpus)], stdout=subprocess.PIPE,
                              text=True, env=cluster.env)
    try:
        if holder.stdout.readline().strip() != "held":
            raise RuntimeError(f"could not hold {cpus:g} CPUs on {cluster.gcs}")
        yield
    finally:
        holder.kill()
        holder.wait(timeout=60)
