"""A running sweep on a cluster that changes under it: a node lost (a spot instance reclaimed,
a node drained or killed), or room again.

A trial that was training on the lost node is a worker failure and Ray continues it from its
last checkpoint on the nodes that remain (a Train worker group: `train.max_failures`; a trial
that trains in its own process: Tune's retries), once it fits there. What this module decides
is how many trials the sweep admits at once, read from the live nodes every few seconds (from
Tune's loop, through the sweep's gate, `components.tuning.gate`):

- never more than the plan's trials at once, and never more than the live nodes hold by the
  plan's own rule (`ResourcePlan.trials_at_once`): no new trial waits PENDING for resources
  that are gone. One console line each time that number changes.
- when the live nodes hold not even one trial, no trial starts; after `grace_s` of that the
  sweep stops (`halt`: the pipeline stops it as it stops on Ctrl-C, state saved, every
  unfinished trial resumable), to be continued with `visiontune run --resume ID` once the
  cluster has room.
- when the sweep ends, however it ends, the placement groups its job left waiting are removed
  (`release_waiting_groups`): a Train run stopped while its worker group waited for room
  leaves one behind that would take the cluster's next free CPUs forever.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from components.cluster import node_resources
from components.tuning.plan import ResourcePlan

POLL_S = 2.0    # how often the live nodes are read (one GCS call)
# How long the live nodes may hold no trial before the sweep stops. Ray marks a node dead only
# after it missed its health checks (seconds to tens of seconds), so what is read here is not
# a blip; the grace covers a node that restarts at once.
GRACE_S = 10.0

log = logging.getLogger(__name__)        # the console's lines (pipelines/console.py)
# What Ray's placement groups needed: Ray's own log (the "ray" logger's handler writes to
# stderr, which the console sends to the run's Ray log file), not the command's story
ray_log = logging.getLogger("ray.visiontune")


def _totals(nodes: list[dict[str, float]], keys) -> dict[str, float]:
    return {k: sum(float(n.get(k, 0)) for n in nodes) for k in keys}


def _amounts(before: dict[str, float], after: dict[str, float]) -> str:
    return ", ".join(f"{before[k]:g} -> {after[k]:g} {k}{'s' if k in ('CPU', 'GPU') else ''}"
                     for k in before)


def change_line(plan: ResourcePlan, before: list[dict[str, float]],
                after: list[dict[str, float]], was: int, now: int,
                grace_s: float = GRACE_S) -> str:
    """The console line for the cluster going from `before` to `after` (each live node's
    resources) and the trials at once from `was` to `now`."""
    keys = [k for k in plan.per_worker if k in ("CPU", "GPU")] or list(plan.per_worker)
    amounts = _amounts(_totals(before, keys), _totals(after, keys))
    if now > was:
        what = "the cluster has room again"
    elif len(after) < len(before):
        lost = len(before) - len(after)
        what = f"the cluster lost {'a node' if lost == 1 else f'{lost} nodes'}"
    else:
        what = "the cluster shrank"
    if now == 0:
        return (f"[visiontune] {what}: {amounts}; no trial fits any more (one needs "
                f"{plan.one_trial_needs()}): none starts, and the sweep stops if the "
                f"cluster has no room within {grace_s:g} s")
    return f"[visiontune] {what}: {amounts}; trials at once {was} -> {now}"


def halt_reason(plan: ResourcePlan, nodes: list[dict[str, float]]) -> str:
    """Why the sweep stops when the live nodes hold no trial."""
    keys = [k for k in plan.per_worker if k in ("CPU", "GPU")] or list(plan.per_worker)
    has = ", ".join(f"{v:g} {k}" for k, v in _totals(nodes, keys).items())
    return (f"the cluster no longer holds one trial ({len(nodes)} node(s) with {has} in all; "
            f"one trial needs {plan.one_trial_needs()})")


def _this_cluster() -> str:
    """The connected cluster's GCS address, for Ray's State API: without one it looks for
    "the" Ray on this host and fails when there are several (two local sweeps at once, or a
    local Ray beside a `ray start`)."""
    import ray

    return ray.get_runtime_context().gcs_address


def _train_controllers_alive(job: str) -> bool:
    from ray.util.state import list_actors

    return bool(list_actors(address=_this_cluster(),
                            filters=[("job_id", "=", job), ("state", "=", "ALIVE"),
                                     ("class_name", "=", "TrainController")], timeout=10,
                            raise_on_missing_output=False))


def _remove_waiting_groups(job: str) -> list[str]:
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_placement_groups

    groups = list_placement_groups(address=_this_cluster(),
                                   filters=[("creator_job_id", "=", job)], limit=10_000,
                                   timeout=10, raise_on_missing_output=False)
    waiting = [g.placement_group_id for g in groups if g.state in ("PENDING", "RESCHEDULING")]
    for group in waiting:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group)))
    return waiting


def release_waiting_groups(wait_s: float = 30.0, quiet_s: float = 4.0) -> int:
    """Remove the placement groups this driver's job still has waiting (PENDING, or
    RESCHEDULING after a lost node) once its sweep is over, and say how many.

    Ray Train's own cleaner removes a dead controller's group only once its worker group had
    started: a Train run stopped while its restarted worker group waited for room (its node
    lost) leaves that group waiting, and Ray places it on the next CPUs that come free (a node
    that joins), for nobody: the resumed trial then waits for CPUs forever. A stopped trial's
    controller runs on for seconds and asks again when its group is removed: groups are
    removed until no controller of the job is left and none appeared for `quiet_s`, for at
    most `wait_s`. Reads Ray's State API (the dashboard, which Train's cleaner needs too);
    without it nothing is removed."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    removed: list[str] = []
    deadline = quiet = time.monotonic()
    deadline += wait_s
    try:
        while time.monotonic() < deadline:
            waiting = _remove_waiting_groups(job)
            removed += waiting
            now = time.monotonic()
            quiet = now if waiting else quiet
            if not waiting and not _train_controllers_alive(job) and \
                    (not removed or now - quiet >= quiet_s):
                break
            time.sleep(1.0)
    except Exception as e:  # no dashboard, or it does not answer: as before
        ray_log.warning("could not release this sweep's placement groups: %s", e)
    if removed:
        ray_log.warning("removed %d placement group(s) the sweep's job left waiting: %s",
                    len(removed), removed)
    return len(removed)


class ClusterWatch:
    """Reads the live nodes at most every `poll_s` (`check`, from Tune's loop) and keeps
    `at_once` (the trials the sweep may run at once) and `halt` (why the sweep must stop, or
    None) up to date (module docstring), and logs a console line when `at_once` changes."""

    def __init__(self, plan: ResourcePlan, *,
                 nodes: Callable[[], list[dict[str, float]]] = node_resources,
                 poll_s: float = POLL_S, grace_s: float = GRACE_S,
                 clock: Callable[[], float] = time.monotonic,
                 release: Callable[[], int] = release_waiting_groups):
        self.plan, self.release = plan, release
        self.at_once = plan.concurrent_trials
        self.halt: str | None = None
        self._read, self._poll_s, self._grace_s, self._clock = nodes, poll_s, grace_s, clock
        self._seen: list[dict[str, float]] | None = None   # the nodes the last line spoke of
        self._next = 0.0
        self._none_since: float | None = None

    def check(self) -> None:
        now = self._clock()
        if self.halt is not None or now < self._next:
            return
        self._next = now + self._poll_s
        try:
            nodes = self._read()
        except Exception:  # the GCS busy or restarting: the next poll tells
            return
        self.update(nodes, now)

    def update(self, nodes: list[dict[str, float]], now: float) -> None:
        """Take the live nodes `nodes` as read at `now` (seconds, `clock`'s)."""
        if self._seen is None:
            self._seen = nodes
        at_once = self.plan.trials_at_once(nodes)
        if at_once != self.at_once:
            log.info(change_line(self.plan, self._seen, nodes, self.at_once, at_once,
                                 self._grace_s))
            self.at_once, self._seen = at_once, nodes
        if at_once > 0:
            self._none_since = None
            return
        if self._none_since is None:
            self._none_since = now
        if now - self._none_since >= self._grace_s:
            self.halt = halt_reason(self.plan, nodes)
