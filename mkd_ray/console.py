"""What `train` and `tune` print, and the watch that turns a stalled run into an error.

Training workers do not print: rank 0 posts each progress line to a `ProgressBoard` actor,
and the driver prints them, once, with the run's label. Ray's own logs stay in its session
files unless `--verbose` (or MKD_RAY_VERBOSE=1) asks for them on the console. The same board
tells the driver when any run last made progress (a line, or steps: see `Heartbeat`); after
`train.stall_timeout_s` without any, the driver interrupts itself (as Ctrl-C would, so Tune
saves a resumable state and Ray Train aborts its workers) and raises `Stalled`, naming what
waits for which resources. Both errors that stop a run early live here: `Stalled` and
`TrainingDiverged`.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import threading
import time
import warnings
from typing import Callable, Optional

VERBOSE_ENV = "MKD_RAY_VERBOSE"
_POLL_S = 2.0
_ABORT_GRACE_S = 30.0


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_libraries() -> None:
    """Keep MLflow's informational logs and Tune's tables off the console (Ray's driver logs:
    `quiet_ray`, once Ray is imported); `--verbose` leaves them as the libraries set them."""
    if verbose():
        return
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when MLflow configures its loggers
    # Tune's own terminal output (its experiment banner prints at any verbosity); the sweep
    # prints its own lines (tune.runner.SweepStatus).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def quiet_ray() -> None:
    """Once Ray is imported (it sets its own warning filters): no warning about the option Ray
    Train's data ingest sets and Ray Data has deprecated (nothing a user can act on). Ray's
    INFO logs are kept off by `ray.init(configure_logging=False)` (train.trainer.connect)."""
    if verbose():
        return
    warnings.filterwarnings("ignore", message=r".*exclude_resources. is deprecated")
    # Under PBT, Tune suggests reusing trial actors, which cannot apply: each trial owns a
    # trainer of its own.
    warnings.filterwarnings("ignore", message=r"Consider boosting PBT performance")
    # A local cluster turns token authentication on by default and says so at every start;
    # Tune's result files warn when a trial that PBT restores had not written one yet (the
    # results are in MLflow; Tune's errors still show).
    for name in ("ray._private.authentication.authentication_token_setup", "ray.tune.logger.logger"):
        logging.getLogger(name).setLevel(logging.ERROR)


class Stalled(RuntimeError):
    """No run made progress for the stall timeout; the message says what waits for what."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the run stops rather than checkpoint non-finite weights."""

    @classmethod
    def at(cls, step: int, lr: float) -> "TrainingDiverged":
        return cls(f"training diverged: the loss is not finite by step {step} (learning rate {lr:g}); "
                   "the run stopped without saving non-finite weights (lower train.lr, or check the data)")


class ProgressBoard:
    """Lines posted by the runs' rank-0 workers, collected until the driver drains them (an
    actor: see `new_board`)."""

    def __init__(self):
        self._lines: list[tuple[str, str]] = []
        self._last_progress = time.monotonic()

    def post(self, run: str, text: str, progress: bool = True) -> None:
        """A line for the console; `progress=False` for a warning, which is not progress."""
        self._lines.append((run, text))
        if progress:
            self.beat()

    def beat(self) -> None:
        """A training step finished: progress, with nothing to print."""
        self._last_progress = time.monotonic()

    def drain(self) -> tuple[list[tuple[str, str]], float]:
        """The lines posted since the last call, and seconds since the last progress."""
        lines, self._lines = self._lines, []
        return lines, time.monotonic() - self._last_progress


class Heartbeat:
    """Tells the board, at most every `every_s` seconds, that steps are being made: a slow log
    interval on a slow machine is not a stall, a step that never ends is."""

    def __init__(self, send: Callable[[], None], every_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.send, self.every_s, self.clock = send, every_s, clock
        self._last = clock()

    def __call__(self) -> None:
        now = self.clock()
        if now - self._last >= self.every_s:
            self._last = now
            self.send()


def new_board():
    """A ProgressBoard actor that holds no CPU (Ray is imported only by the commands that use it)."""
    import ray

    return ray.remote(num_cpus=0)(ProgressBoard).remote()


class Console:
    """Prints the board's lines from a driver thread and watches for a stall."""

    def __init__(self, board, stall_timeout_s: float, label: Callable[[str], str] = lambda run: "",
                 what: str = "the run"):
        self.board, self.stall_timeout_s, self.label, self.what = board, stall_timeout_s, label, what
        self.stalled: Optional[Stalled] = None
        self._printing = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mkd-console", daemon=True)

    def __enter__(self) -> "Console":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.say()

    def say(self, text: Optional[str] = None) -> None:
        """Print what the board holds so far, then `text`: an event (a trial ending) comes
        after the progress lines that led to it."""
        with self._printing:
            self._print(self._drain()[0])
            if text is not None:
                print(text, flush=True)

    def _drain(self) -> tuple[list, float]:
        import ray

        try:
            return ray.get(self.board.drain.remote(), timeout=30)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
            return [], 0.0

    def _print(self, lines) -> None:
        for run, text in lines:
            print(f"{self.label(run)}{text}", flush=True)

    def _watch(self) -> None:
        while not self._stop.wait(_POLL_S):
            with self._printing:
                lines, idle = self._drain()
                self._print(lines)
            if self.stall_timeout_s and idle > self.stall_timeout_s:
                self.stalled = Stalled(
                    f"{self.what} made no progress for {idle:.0f} s (train.stall_timeout_s={self.stall_timeout_s:g}): "
                    f"{waiting_for_resources()}. Free CPUs for what waits (lower scaling.num_workers, "
                    "scaling.cpus_per_worker, scaling.data_cpus or tune.max_concurrent_trials), or raise "
                    "train.stall_timeout_s if one step or evaluation is just slow")
                self._interrupt_main()
                return

    def _interrupt_main(self) -> None:
        """As a user would: Ctrl-C (Tune saves its state and stops, Train aborts its workers),
        and twice more if the driver is still busy after a grace period (Ray Train's forced
        abort: its graceful one waits for a controller that may be blocked on resources)."""
        _thread.interrupt_main(signal.SIGINT)
        if self._stop.wait(_ABORT_GRACE_S):
            return
        for _ in range(2):
            _thread.interrupt_main(signal.SIGINT)
            if self._stop.wait(1.0):
                return


def waiting_for_resources() -> str:
    """What the cluster cannot schedule (placement groups, actors) and what is free."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    waits = []
    try:
        from ray.util.state import list_actors, list_placement_groups

        for group in list_placement_groups(filters=[("state", "=", "PENDING")], detail=True, timeout=10):
            need = _sum_resources(bundle.get("unit_resources", {}) for bundle in group.bundles or [])
            waits.append(f"placement group {group.name or group.placement_group_id[:8]} waits for {_format(need)}")
        for actor in list_actors(filters=[("state", "=", "PENDING_CREATION")], detail=True, timeout=10):
            needs = actor.required_resources or {}
            # An actor that needs nothing is not held back by the cluster: its process or
            # constructor is slow (a loaded machine, a slow import).
            waits.append(f"actor {actor.class_name} waits for {_format(needs)}" if needs else
                         f"actor {actor.class_name} is still starting (it needs no resources)")
    except Exception as exc:  # the State API is a diagnosis aid: its failure must not hide the stall
        waits.append(f"(Ray's state API did not answer: {type(exc).__name__})")
    found = "; ".join(waits) if waits else "nothing waits for resources (a step or an evaluation is slow or hung)"
    return f"{found}; free {free.get('CPU', 0.0):g} of {total.get('CPU', 0.0):g} CPUs"


def _sum_resources(bundles) -> dict:
    total: dict = {}
    for bundle in bundles:
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


def _format(resources: dict) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU")} or resources
    return ", ".join(f"{v:g} {k}" for k, v in shown.items()) or "no resources"
