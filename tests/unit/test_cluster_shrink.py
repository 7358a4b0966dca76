"""A sweep's cluster losing nodes (components.tuning.cluster_watch, the plan's
`trials_at_once` and the gate's admission), without Ray running: nodes are the resource dicts
`ray.nodes()` reports for live nodes, time is a fake clock."""

from __future__ import annotations

import itertools

import pytest

from components.config import Config
from components.tuning import gate as g
from components.tuning.cluster_watch import ClusterWatch, change_line, halt_reason
from components.tuning.gate import GatedVariantGenerator, SweepGate, TrialShape
from components.tuning.plan import ResourcePlan, plan_resources, plan_sweep
from components.tuning.space import TRIAL_SECTIONS
from tests.conftest import log_lines

CPU1, GPU1 = {"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}


def _nodes(*cpus: float, gpus: float = 0) -> list[dict[str, float]]:
    return [{"CPU": c, "memory": 1e9, **({"GPU": gpus} if gpus else {})} for c in cpus]


def _ddp(num_workers: int, nodes, trials: int = 4) -> ResourcePlan:
    return plan_resources(nodes, trials, num_workers, CPU1)


# ----------------------------------------------------------------- how many trials fit


@pytest.mark.parametrize("workers,before,after,at_once", [
    (2, (2, 2), (2,), 1),        # two DDP trials of 2 workers, one node lost: one at once
    (1, (2, 2), (2,), 2),        # four 1-worker trials: two still fit
    (4, (2, 2), (2,), 0),        # a trial that needs both nodes: none fits
    (2, (4, 4, 4), (4, 4), 4),   # 4 trials at once planned (of 4), 8 CPUs left hold 4
    (3, (2, 2, 2), (2, 1), 1),   # workers spread over nodes: 3 slots left, one trial of 3
])
def test_ddp_trials_at_once_follow_the_live_nodes(workers, before, after, at_once):
    plan = _ddp(workers, _nodes(*before))
    assert plan.trials_at_once(_nodes(*before)) == plan.concurrent_trials
    assert plan.trials_at_once(_nodes(*after)) == min(at_once, plan.concurrent_trials)


def test_a_trial_that_trains_itself_must_fit_on_one_node():
    # auto on two 2-CPU nodes and 2 trials: each trial holds 2 CPUs (torch threads)
    plan = plan_sweep(_nodes(2, 2), 2, "auto", CPU1)
    assert plan.in_trial and plan.per_worker == {"CPU": 2.0} and plan.concurrent_trials == 2
    assert plan.trials_at_once(_nodes(2)) == 1
    # 2 CPUs in all, but on two nodes: a trial of 2 CPUs fits on neither
    assert plan.trials_at_once(_nodes(1, 1)) == 0
    assert plan.one_trial_needs() == "2 CPU on one node"


def test_gpus_count_per_node_and_a_bigger_cluster_never_raises_the_plan():
    plan = plan_resources(_nodes(8, 8, gpus=2), 8, 1, GPU1)
    assert plan.concurrent_trials == 4
    assert plan.trials_at_once(_nodes(8, gpus=2)) == 2
    assert plan.trials_at_once(_nodes(8, 8, 8, 8, gpus=2)) == 4   # never above the plan
    assert plan.trials_at_once(_nodes(8, 8)) == 0                  # the GPU nodes are gone


@pytest.mark.parametrize("cpus,trials,workers", itertools.product(
    [(2,), (2, 2), (4, 2), (3, 3, 1), (8,)], [1, 2, 5], [1, 2, 3]))
def test_on_the_nodes_it_was_made_for_a_plan_keeps_its_trials_at_once(cpus, trials, workers):
    """The rule read while the sweep runs is the rule the plan was made with."""
    nodes = _nodes(*cpus)
    if sum(cpus) < workers:
        return  # the plan refuses it (tested in test_tuning_plan.py)
    for plan in (plan_resources(nodes, trials, workers, CPU1),
                 plan_sweep(nodes, trials, "auto", CPU1)):
        assert plan.trials_at_once(nodes) == plan.concurrent_trials


# ----------------------------------------------------------------- the watch over time


class _Cluster:
    def __init__(self, nodes):
        self.nodes, self.now, self.reads = nodes, 0.0, 0

    def read(self):
        self.reads += 1
        if isinstance(self.nodes, Exception):
            raise self.nodes
        return self.nodes

    def clock(self) -> float:
        return self.now


@pytest.fixture
def lines():
    """The console lines the watch logs during the test."""
    with log_lines("components.tuning.cluster_watch") as said:
        yield said


def _watch(plan, cluster: _Cluster, grace_s: float = 10.0) -> ClusterWatch:
    return ClusterWatch(plan, nodes=cluster.read, poll_s=2.0, grace_s=grace_s,
                        clock=cluster.clock)


def test_a_lost_node_lowers_the_trials_at_once_with_one_line_and_room_raises_them_again(lines):
    plan = _ddp(2, _nodes(2, 2))
    cluster = _Cluster(_nodes(2, 2))
    watch = _watch(plan, cluster)
    watch.check()
    assert (watch.at_once, lines) == (2, [])
    cluster.nodes = _nodes(2)
    for cluster.now in (0.5, 1.0, 2.0, 2.5, 4.0, 6.0):   # read every 2 s, one line
        watch.check()
    assert cluster.reads == 4
    assert lines == ["[visiontune] the cluster lost a node: 4 -> 2 CPUs; trials at once 2 -> 1"]
    assert watch.at_once == 1 and watch.halt is None
    cluster.nodes, cluster.now = _nodes(2, 2), 8.0
    watch.check()
    assert lines[-1] == ("[visiontune] the cluster has room again: 2 -> 4 CPUs; trials at "
                         "once 1 -> 2")
    assert len(lines) == 2


def test_no_room_for_one_trial_stops_the_sweep_after_the_grace_unless_room_comes_back(lines):
    plan = _ddp(4, _nodes(2, 2), trials=2)
    cluster = _Cluster(_nodes(2, 2))
    watch = _watch(plan, cluster)
    watch.check()
    cluster.nodes, cluster.now = _nodes(2), 2.0
    watch.check()
    assert watch.at_once == 0 and watch.halt is None
    assert lines == ["[visiontune] the cluster lost a node: 4 -> 2 CPUs; no trial fits any "
                     "more (one needs 4 workers x (1 CPU)): none starts, and the sweep stops "
                     "if the cluster has no room within 10 s"]
    cluster.nodes, cluster.now = _nodes(2, 2), 6.0      # a node back within the grace
    watch.check()
    assert watch.at_once == 1 and watch.halt is None
    cluster.nodes = _nodes(2)
    for cluster.now in (8.0, 10.0, 12.0, 14.0, 16.0):
        watch.check()
    assert watch.halt is None                            # 8 s without room so far
    cluster.now = 18.0
    watch.check()
    assert watch.halt == ("the cluster no longer holds one trial (1 node(s) with 2 CPU in all; "
                          "one trial needs 4 workers x (1 CPU))")
    cluster.now, reads = 30.0, cluster.reads
    watch.check()
    assert cluster.reads == reads                        # halted: no more reads


def test_a_failed_read_changes_nothing(lines):
    plan = _ddp(2, _nodes(2, 2))
    cluster = _Cluster(ConnectionError("GCS busy"))
    watch = _watch(plan, cluster)
    for cluster.now in (0.0, 2.0, 4.0, 40.0):
        watch.check()
    assert (watch.at_once, watch.halt, lines) == (2, None, [])


def test_the_lines_name_what_was_lost():
    plan = _ddp(1, _nodes(4, 4, 4), trials=12)
    assert change_line(plan, _nodes(4, 4, 4), _nodes(4), 12, 4) == (
        "[visiontune] the cluster lost 2 nodes: 12 -> 4 CPUs; trials at once 12 -> 4")
    assert change_line(plan, _nodes(4, 4), _nodes(4, 2), 8, 6) == (
        "[visiontune] the cluster shrank: 8 -> 6 CPUs; trials at once 8 -> 6")
    gpu = plan_resources(_nodes(8, 8, gpus=2), 8, 1, GPU1)
    assert change_line(gpu, _nodes(8, 8, gpus=2), _nodes(8, gpus=2), 4, 2) == (
        "[visiontune] the cluster lost a node: 16 -> 8 CPUs, 4 -> 2 GPUs; trials at once "
        "4 -> 2")
    assert halt_reason(gpu, _nodes(8, 8)) == ("the cluster no longer holds one trial (2 "
                                              "node(s) with 16 CPU, 0 GPU in all; one trial "
                                              "needs 1 CPU, 1 GPU on one node)")


# ----------------------------------------------------------------- the gate admits what fits


def _shape() -> TrialShape:
    return TrialShape([], {s: getattr(Config(), s) for s in TRIAL_SECTIONS}, 2)


def test_the_generator_admits_at_once_only_what_the_live_nodes_hold():
    from ray import tune

    def trainable(config):
        pass

    plan = _ddp(2, _nodes(2, 2))
    gate = SweepGate("t-shrink", _shape())
    cluster = _Cluster(_nodes(2, 2))
    gate.cluster = _watch(plan, cluster)
    gen = GatedVariantGenerator("t-shrink", random_state=0, max_concurrent=2)
    gen.add_configurations({"e": {"run": trainable, "num_samples": 1,
                                  "config": {"a": tune.grid_search([1, 2, 3, 4])}}})
    with g.gate_for(gate):
        first = [gen.next_trial(), gen.next_trial(), gen.next_trial()]
        assert first[2] is None and all(first[:2])           # 2 at once, as planned
        gen.on_trial_complete(first[0].trial_id)
        cluster.nodes, cluster.now = _nodes(2), 2.0
        gate.on_step_begin(0, [])
        assert gen.next_trial() is None                      # one still runs: it is the one
        gen.on_trial_complete(first[1].trial_id)
        assert gen.next_trial() is not None
        cluster.nodes, cluster.now = _nodes(1), 4.0          # nothing fits: wait, not drop
        gate.on_step_begin(0, [])
        assert gen.next_trial() is None and not gen.is_finished() and gate.reason is None
        cluster.now = 14.0                                   # past the grace: the gate closes
        gate.on_step_begin(0, [])
        assert gate.halt is not None and gate.reason == gate.halt
        assert gen.next_trial() is None
    assert gate.started == 3


def test_an_unwatched_gate_changes_nothing():
    gate = SweepGate("t", _shape())
    gate.on_step_begin(0, [])
    gate.on_experiment_end([])
    assert gate.at_once() is None and gate.halt is None and gate.admits({})


def test_the_end_of_a_watched_sweep_releases_what_it_left_waiting():
    released = []
    gate = SweepGate("t", _shape())
    gate.cluster = ClusterWatch(_ddp(2, _nodes(2, 2)), nodes=lambda: _nodes(2, 2),
                                release=lambda: released.append(1) or 1)
    gate.on_experiment_end([])
    assert released == [1]
