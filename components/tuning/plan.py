"""How a sweep uses the cluster: how many workers each trial trains with, where it trains
(in the Tune trial's own process, or in a Ray Train worker group) and how many trials run at
once. Every trial's workers must fit the cluster together, because a Ray Train worker group
that cannot start is retried instead of failing.

The rule of `train.num_workers: auto` (`plan_sweep`), measured in docs/performance.md ("How a
sweep uses the cluster"): a trial trains in its own process on one worker's resources, as many
side by side as the cluster holds, unless there are fewer trials than GPUs and the model is
large enough to keep several GPUs busy; then each trial trains data-parallel (DDP) on the GPUs
of one node. On CPUs, data parallelism costs a gradient all-reduce per step and a worker group
per trial; the spare CPUs of a sweep with fewer trials than CPUs become torch threads of each
trial's process instead."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from components.errors import UserError

# What a Tune trial itself holds: its Train workers hold the CPUs/GPUs, the trial only drives
# them. A token amount of a resource every Ray node has (`memory`, in bytes): no custom
# resource and no start flag is needed on any node. A bundle of {"cpu": 0} alone is refused
# by Tune (zero entries are dropped and an empty bundle is rejected).
TRIAL_RESOURCES = {"cpu": 0, "memory": 1}


class ResourceError(UserError, RuntimeError):
    """The configuration can never fit the cluster."""


@dataclass(frozen=True)
class ResourcePlan:
    num_trials: int
    workers_per_trial: int
    per_worker: dict
    concurrent_trials: int
    cluster: dict
    # True: each trial trains in its own Tune process on `per_worker` (no Ray Train worker
    # group); False: each trial fits a `TorchTrainer` of `workers_per_trial` workers.
    in_trial: bool = False
    reason: str = ""

    @property
    def cpus_per_trial(self) -> float:
        return self.per_worker.get("CPU", 0) * self.workers_per_trial

    def trial_resources(self) -> dict[str, float]:
        """What the Tune trial itself holds: the worker's resources when it trains itself,
        else a token amount (its Train workers hold the CPUs/GPUs)."""
        return dict(self.per_worker) if self.in_trial else dict(TRIAL_RESOURCES)

    def trials_fitting(self, nodes: list[dict[str, float]]) -> int:
        """How many of this plan's trials `nodes` (each live node's resources) hold at once,
        by the rule the plan was made with: every worker on one node, a trial's workers on
        any nodes. 0: not even one."""
        slots = sum(_workers_on(n, self.per_worker) for n in nodes)
        return slots // max(1, self.workers_per_trial)

    def trials_at_once(self, nodes: list[dict[str, float]]) -> int:
        """The plan's trials at once, or fewer when `nodes` no longer hold that many."""
        return min(self.concurrent_trials, self.trials_fitting(nodes))

    def one_trial_needs(self) -> str:
        per = ", ".join(f"{v:g} {k}" for k, v in self.per_worker.items())
        return (f"{per} on one node" if self.workers_per_trial == 1 else
                f"{self.workers_per_trial} workers x ({per})")

    def describe(self, epochs: int) -> str:
        waves = math.ceil(self.num_trials / self.concurrent_trials)
        per = ", ".join(f"{v:g} {k}" for k, v in self.per_worker.items())
        how = (f"1 worker per trial, in the trial's own process ({per})" if self.in_trial else
               f"{self.workers_per_trial} DDP worker(s) per trial ({per} each)")
        return (f"plan: {self.num_trials} trials x {epochs} epochs (at most "
                f"{self.num_trials * epochs} trial-epochs), {how}, {self.concurrent_trials} "
                f"trial(s) at once on {self.cluster.get('CPU', 0):g} CPUs / "
                f"{self.cluster.get('GPU', 0):g} GPUs -> {waves} wave(s)"
                + (f"\n    why: {self.reason}" if self.reason else ""))


def _workers_on(node: dict[str, float], per_worker: dict[str, float]) -> int:
    """How many workers asking `per_worker` one node can hold at once."""
    counts = [math.floor(float(node.get(k, 0)) / v + 1e-9) for k, v in per_worker.items()
              if v > 0]
    return min(counts) if counts else 10**6


def plan_resources(nodes: list[dict[str, float]] | dict[str, float], num_trials: int,
                   num_workers: int, per_worker: dict[str, float],
                   max_concurrent: int | None = None) -> ResourcePlan:
    """`nodes`: each node's resources (`components.cluster.node_resources()`; one dict = a
    one-node cluster); `per_worker` what one worker asks for. A worker must fit on one node:
    two GPU workers need GPU nodes with room for them, not a cluster whose GPUs add up."""
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


# Below this many parameters a model cannot keep two GPUs busy: its steps are too short for
# the gradient all-reduce to hide behind (ResNet-18 has 11.2 M, the small CNN about 0.1 M).
DDP_MIN_PARAMS = 5_000_000


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 50_000 else f"{n / 1e6:.2f} M"


def plan_sweep(nodes: list[dict[str, float]] | dict[str, float], num_trials: int,
               num_workers: int | str, per_worker: dict[str, float],
               max_concurrent: int | None = None, *, model_params: tuple[int, ...] = (),
               k_fold: bool = False) -> ResourcePlan:
    """The sweep's plan. An explicit `num_workers` is obeyed (a `TorchTrainer` of that many
    DDP workers per trial); `"auto"` chooses (module docstring). `model_params`: the sizes of
    the models the sweep trains (one per `model.name` it tries)."""
    if num_workers != "auto":
        plan = plan_resources(nodes, num_trials, int(num_workers), per_worker, max_concurrent)
        return dataclasses.replace(plan, reason=f"train.num_workers={num_workers}: "
                                                "data-parallel trials (Ray Train, DDP)")
    nodes = [nodes] if isinstance(nodes, dict) else list(nodes)
    one = plan_resources(nodes, num_trials, 1, per_worker, max_concurrent)  # or says why not
    fits = [_workers_on(n, per_worker) for n in nodes]
    slots, wanted = sum(fits), min(num_trials, max_concurrent or num_trials)
    gpu, largest = "GPU" in per_worker, max(model_params, default=0)
    size = (_millions(min(model_params)) + ("" if min(model_params) == largest else
                                            f"-{_millions(largest)}")) if model_params else "?"
    if k_fold:
        return dataclasses.replace(one, reason="k-fold CV: each fold is a Ray Train run of "
                                               "one worker")
    if gpu and largest >= DDP_MIN_PARAMS and wanted < slots and max(fits) > 1:
        workers = min(slots // wanted, max(fits))
        plan = plan_resources(nodes, num_trials, workers, per_worker, max_concurrent)
        return dataclasses.replace(plan, reason=(
            f"{wanted} trial(s) at once for {slots:g} GPUs and a model of {size} parameters: "
            f"each trial trains data-parallel on {workers} GPUs of one node"))
    threads = 1 if gpu else max(1, min(slots // wanted, max(fits)))
    per_trial = dict(per_worker)
    if threads > 1:
        per_trial["CPU"] = per_worker["CPU"] * threads
    at_once = min(wanted, sum(_workers_on(n, per_trial) for n in nodes))
    device = "GPUs" if gpu else "CPUs"
    if gpu:
        why = (f"a model of {size} parameters cannot keep more than one GPU busy"
               if largest < DDP_MIN_PARAMS else f"{num_trials} trials fill the {slots:g} GPUs")
    else:
        why = (f"data parallelism would not pay for a model of {size} parameters on CPUs: "
               "trials side by side keep every core busy with no gradient all-reduce and no "
               "worker group per trial")
        if threads > 1:
            why += f"; each trial uses its {threads} CPUs as torch threads"
    return ResourcePlan(num_trials, 1, per_trial, at_once, one.cluster, in_trial=True,
                        reason=f"{num_trials} trials, 1 worker each, {at_once} at once on "
                               f"{device}: {why}")
