"""What one training run needs from the cluster, checked before anything starts, and the
part of it that Ray reserves as one placement group.

A run needs its training workers and its Ray Data augmenting actors (one per worker, as far
as the CPUs go); a Tune trial needs its driver as well. Ray Train V2 places the workers in a
placement group of its own, so a run cannot hold them together with anything else. What it
can do is take everything else in one atomic reservation: the trial's driver and its data
actors (Tune's PlacementGroupFactory for a trial; a placement group made here for `train`).
A run that holds its reservation then waits only for its worker group, never for CPUs that
another run's workers took, so concurrent runs cannot each hold part of what they need.
The sweep admits only as many trials as fit whole, reservation and workers together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mkd_ray.config import ConfigError, ExperimentConfig

_EPS = 1e-9


@dataclass(frozen=True)
class RunResources:
    """The CPUs (and GPUs) of one run: driver (a Tune trial's function; 0 for `train`, whose
    driver is the user's process), workers, and data actors."""

    driver_cpus: float
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    data_actors: int
    data_cpus: float

    @property
    def cpus(self) -> float:
        return self.driver_cpus + self.workers * self.cpus_per_worker + self.data_actors * self.data_cpus

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker

    def reserved_bundles(self) -> list[dict]:
        """The placement-group bundles taken in one step: the driver first (Tune runs the
        trial function in bundle 0), then one bundle per data actor."""
        driver = [{"CPU": self.driver_cpus}] if self.driver_cpus else []
        return driver + [{"CPU": self.data_cpus}] * self.data_actors

    def describe(self) -> str:
        parts = [f"driver {self.driver_cpus:g}"] if self.driver_cpus else []
        parts.append(f"{self.workers} worker(s) x scaling.cpus_per_worker {self.cpus_per_worker:g}")
        if self.data_actors:
            parts.append(f"{self.data_actors} data actor(s) x scaling.data_cpus {self.data_cpus:g}")
        return " + ".join(parts)


def plan_run(cfg: ExperimentConfig, cluster: dict, driver_cpus: float = 0.0) -> RunResources:
    """The resources of one run of `cfg` on a cluster with `cluster` resources (as
    `ray.cluster_resources()` reports them); a ConfigError naming the numbers and the settings
    to change if it cannot fit at all."""
    s = cfg.scaling
    workers = max(s.num_workers, 1)
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    gpus_per_worker = 1.0 if s.use_gpu else 0.0
    if s.use_gpu and gpus < workers:
        raise ConfigError("scaling.use_gpu", f"{workers} worker(s) need {workers} GPUs; the cluster has {gpus:g} "
                          "(set scaling.num_workers to at most the GPUs, or scaling.use_gpu=false)")
    without_data = driver_cpus + workers * s.cpus_per_worker
    actors = 0
    if cfg.method.uses_unlabeled:
        # One augmenting actor per worker, as far as the CPUs left by the workers go.
        actors = min(workers, math.floor((cpus - without_data) / s.data_cpus + _EPS))
        if actors < 1:
            raise ConfigError("scaling", f"one run needs {without_data + s.data_cpus:g} CPUs ("
                              f"{RunResources(driver_cpus, workers, s.cpus_per_worker, 0, 1, s.data_cpus).describe()}); "
                              f"the cluster has {cpus:g}. Lower scaling.num_workers, scaling.cpus_per_worker or "
                              "scaling.data_cpus, or add CPUs to the cluster")
    elif without_data > cpus + _EPS:
        raise ConfigError("scaling", f"one run needs {without_data:g} CPUs ({workers} worker(s) x scaling.cpus_per_worker "
                          f"{s.cpus_per_worker:g}); the cluster has {cpus:g}. Lower scaling.num_workers or "
                          "scaling.cpus_per_worker, or add CPUs to the cluster")
    return RunResources(driver_cpus, workers, s.cpus_per_worker, gpus_per_worker, actors, s.data_cpus)


def runs_that_fit(run: RunResources, cluster: dict) -> int:
    """How many such runs fit side by side, whole (at least one: `plan_run` checked that)."""
    fits = math.floor((cluster.get("CPU", 0.0) + _EPS) / run.cpus)
    if run.gpus:
        fits = min(fits, math.floor(cluster.get("GPU", 0.0) / run.gpus + _EPS))
    return max(fits, 1)
