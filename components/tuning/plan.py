"""How many trials run at once: every trial's workers must fit the cluster together, because
a Ray Train worker group that cannot start is retried instead of failing."""

from __future__ import annotations

import math
from dataclasses import dataclass

TRIAL_SLOT = "TRAIN_DRIVER"  # custom resource a trial holds instead of a CPU its workers need


class ResourceError(RuntimeError):
    """The configuration can never fit the cluster."""


@dataclass(frozen=True)
class ResourcePlan:
    num_trials: int
    workers_per_trial: int
    cpus_per_trial: float
    gpus_per_trial: int
    concurrent_trials: int
    cluster_cpus: float
    cluster_gpus: float

    def describe(self, epochs: int) -> str:
        waves = math.ceil(self.num_trials / self.concurrent_trials)
        return (f"plan: {self.num_trials} trials x {epochs} epochs (at most "
                f"{self.num_trials * epochs} trial-epochs), {self.workers_per_trial} DDP "
                f"workers per trial ({self.cpus_per_trial:g} CPU, {self.gpus_per_trial} GPU), "
                f"{self.concurrent_trials} trial(s) at once on {self.cluster_cpus:g} CPUs / "
                f"{self.cluster_gpus:g} GPUs -> {waves} wave(s)")


def plan_resources(cluster: dict[str, float], num_trials: int, num_workers: int,
                   cpus_per_worker: float, use_gpu: bool,
                   max_concurrent: int | None = None) -> ResourcePlan:
    """`cluster` is `ray.cluster_resources()` (keys CPU, GPU, ...)."""
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    need_cpu = num_workers * cpus_per_worker
    need_gpu = num_workers if use_gpu else 0
    missing = []
    if need_cpu > cpus:
        missing.append(f"{need_cpu:g} CPUs (cluster has {cpus:g})")
    if need_gpu > gpus:
        missing.append(f"{need_gpu} GPUs (cluster has {gpus:g})")
    if missing:
        raise ResourceError(
            f"one trial needs {num_workers} workers x {cpus_per_worker:g} CPU"
            f"{' + 1 GPU' if use_gpu else ''} and can never fit: missing "
            f"{' and '.join(missing)}. Lower train.num_workers or train.cpus_per_worker"
            f"{', set train.use_gpu=false' if need_gpu > gpus else ''}, or add nodes.")
    fit = math.floor(cpus / need_cpu + 1e-9)
    if use_gpu:
        fit = min(fit, math.floor(gpus / need_gpu + 1e-9))
    if TRIAL_SLOT in cluster:
        fit = min(fit, int(cluster[TRIAL_SLOT]))
    fit = max(1, min(fit, num_trials, max_concurrent or fit))
    return ResourcePlan(num_trials, num_workers, need_cpu, need_gpu, fit, cpus, gpus)
