"""How many trials run at once: every trial's workers must fit the cluster together, because
a Ray Train worker group that cannot start is retried instead of failing."""

from __future__ import annotations

import math
from dataclasses import dataclass

# What a Tune trial itself holds: its Train workers hold the CPUs/GPUs, the trial only drives
# them. A token amount of a resource every Ray node has (`memory`, in bytes): no custom
# resource and no start flag is needed on any node. A bundle of {"cpu": 0} alone is refused
# by Tune (zero entries are dropped and an empty bundle is rejected).
TRIAL_RESOURCES = {"cpu": 0, "memory": 1}


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


def node_resources() -> list[dict[str, float]]:
    """Resources of every live node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _workers_on(node: dict[str, float], per_worker: dict[str, float]) -> int:
    """How many workers asking `per_worker` one node can hold at once."""
    counts = [math.floor(float(node.get(k, 0)) / v + 1e-9) for k, v in per_worker.items()
              if v > 0]
    return min(counts) if counts else 10**6


def plan_resources(nodes: list[dict[str, float]] | dict[str, float], num_trials: int,
                   num_workers: int, per_worker: dict[str, float],
                   max_concurrent: int | None = None) -> ResourcePlan:
    """`nodes`: each node's resources (`node_resources()`; one dict = a one-node cluster);
    `per_worker` what one worker asks for. A worker must fit on one node: two GPU workers need
    GPU nodes with room for them, not a cluster whose GPUs add up."""
    nodes = [nodes] if isinstance(nodes, dict) else list(nodes)
    cluster: dict[str, float] = {}
    for node in nodes:
        for k, v in node.items():
            cluster[k] = cluster.get(k, 0.0) + float(v)
    asks = ", ".join(f"{v:g} {k}" for k, v in per_worker.items())
    advice = (f"Lower train.num_workers or the per-worker resources (train.cpus_per_worker, "
              f"train.resources_per_worker{', train.use_gpu' if 'GPU' in per_worker else ''}"
              f"), or add nodes.")
    missing = [f"{amount * num_workers:g} {key} (cluster has {cluster.get(key, 0):g})"
               for key, amount in per_worker.items()
               if amount * num_workers > cluster.get(key, 0) + 1e-9]
    if missing:
        raise ResourceError(f"one trial needs {num_workers} workers x ({asks}) and can never "
                            f"fit: missing {' and '.join(missing)}. {advice}")
    slots = sum(_workers_on(n, per_worker) for n in nodes)
    if slots < num_workers:
        largest = max(nodes, key=lambda n: _workers_on(n, per_worker), default={})
        per_node = ", ".join(f"{float(largest.get(k, 0)):g} {k}" for k in per_worker)
        raise ResourceError(
            f"one trial needs {num_workers} workers x ({asks}) and can never fit: a worker "
            f"must fit on one node and the nodes hold {slots} such worker(s) in all (the "
            f"largest has {per_node}). {advice}")
    fit = max(1, min(slots // num_workers, num_trials, max_concurrent or num_trials))
    return ResourcePlan(num_trials, num_workers, dict(per_worker), fit, cluster)
