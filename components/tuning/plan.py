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
    per_worker: dict
    concurrent_trials: int
    cluster: dict

    @property
    def cpus_per_trial(self) -> float:
        return self.per_worker.get("CPU", 0) * self.workers_per_trial

    def describe(self, epochs: int) -> str:
        waves = math.ceil(self.num_trials / self.concurrent_trials)
        per = ", ".join(f"{v:g} {k}" for k, v in self.per_worker.items())
        return (f"plan: {self.num_trials} trials x {epochs} epochs (at most "
                f"{self.num_trials * epochs} trial-epochs), {self.workers_per_trial} DDP "
                f"workers per trial ({per} each), {self.concurrent_trials} trial(s) at once on "
                f"{self.cluster.get('CPU', 0):g} CPUs / {self.cluster.get('GPU', 0):g} GPUs "
                f"-> {waves} wave(s)")


def plan_resources(cluster: dict[str, float], num_trials: int, num_workers: int,
                   per_worker: dict[str, float], max_concurrent: int | None = None
                   ) -> ResourcePlan:
    """`cluster` is `ray.cluster_resources()`; `per_worker` what one worker asks for."""
    missing, fits = [], []
    for key, amount in per_worker.items():
        need = amount * num_workers
        have = float(cluster.get(key, 0))
        if need > have + 1e-9:
            missing.append(f"{need:g} {key} (cluster has {have:g})")
        else:
            fits.append(math.floor(have / need + 1e-9))
    if missing:
        asks = ", ".join(f"{v:g} {k}" for k, v in per_worker.items())
        raise ResourceError(
            f"one trial needs {num_workers} workers x ({asks}) and can never fit: missing "
            f"{' and '.join(missing)}. Lower train.num_workers or the per-worker resources "
            f"(train.cpus_per_worker, train.resources_per_worker"
            f"{', train.use_gpu' if 'GPU' in per_worker else ''}), or add nodes.")
    fit = min(fits) if fits else num_trials
    if TRIAL_SLOT in cluster:
        fit = min(fit, int(cluster[TRIAL_SLOT]))
    fit = max(1, min(fit, num_trials, max_concurrent or fit))
    return ResourcePlan(num_trials, num_workers, dict(per_worker), fit, dict(cluster))
