"""A placement group whose creator, an actor, died: Ray keeps it, with its CPUs, until the job
ends. A Ray Train controller lost with its node while its worker group was starting left one
on the node that remained (Train's own cleaner knew of it only once the workers had started),
and every trial retried there waited for those CPUs until it failed (seen in a CI-like run of
the lost-node fault test). A real local Ray: two stand-in controllers each hold a CPU, one is
killed, and the driver asks for a CPU of its own."""

from __future__ import annotations

import time

import pytest
import ray
from ray.util.placement_group import placement_group

from components.tuning.cluster_watch import remove_orphaned_groups

pytestmark = pytest.mark.slow


@ray.remote(num_cpus=0)
class _Controller:
    """What a Train controller does with its worker group's resources."""

    def reserve(self) -> str:
        group = placement_group([{"CPU": 1}])
        ray.get(group.ready(), timeout=60)
        return group.id.hex()


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _states() -> dict[str, str]:
    return {group: info["state"] for group, info in ray.util.placement_group_table().items()}


def test_the_group_of_a_dead_controller_is_removed_and_its_cpu_comes_back(local_ray):
    alive, dead = _Controller.remote(), _Controller.remote()
    kept, orphan = ray.get([alive.reserve.remote(), dead.reserve.remote()])
    ray.kill(dead)
    mine = placement_group([{"CPU": 1}])   # the driver's own (as Tune's trials are)
    assert not mine.wait(2)                # no CPU left: the dead one's group holds it
    assert _states()[orphan] == "CREATED"  # Ray keeps it while the job runs

    deadline, removed = time.time() + 30, []
    while not removed and time.time() < deadline:   # until the GCS has the actor dead
        removed = remove_orphaned_groups()
        time.sleep(0.5)
    assert removed == [orphan]
    assert mine.wait(30)                   # its CPU is back
    states = _states()
    assert states[orphan] == "REMOVED"
    assert states[kept] == "CREATED"       # a live controller's group stays
    assert states[mine.id.hex()] == "CREATED"
    assert remove_orphaned_groups() == []  # nothing left to do
    ray.kill(alive)


def test_without_ray_nothing_is_removed_and_no_ray_is_started():
    assert not ray.is_initialized()
    assert remove_orphaned_groups() == []
    assert not ray.is_initialized()
