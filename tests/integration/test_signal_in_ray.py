"""A second Ctrl-C while the driver waits in Ray's compiled code (Tune's loop winding down
calls `ray.wait`): the signal handler's `Interrupted` comes out of `CoreWorker.wait` as a
SystemError "returned a result with an exception set", caused by it. Seen in a CI-like run of
the two-Ctrl-C fault test: the run ended FAILED with exit 1 instead of KILLED with 130. A real
local Ray and real signals to this process."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray

from pipelines.interrupt import SignalGuard, interrupted

pytestmark = pytest.mark.slow


@ray.remote(num_cpus=1)
def _busy() -> None:
    time.sleep(60)


@pytest.fixture
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_a_second_ctrl_c_inside_ray_wait_is_still_the_interrupt(local_ray, capsys):
    ref = _busy.remote()
    caught = None
    with SignalGuard() as guard, guard.noting():
        os.kill(os.getpid(), signal.SIGINT)          # the first: noted, the sweep winds down
        assert guard.requested
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        try:
            ray.wait([ref], timeout=20)               # the second lands in here
        except BaseException as e:                    # noqa: BLE001 (what came out is the test)
            caught = e
    ray.cancel(ref, force=True)
    assert caught is not None, "the second Ctrl-C did not stop the wait"
    stop = interrupted(caught)
    assert stop is not None and stop.signum == signal.SIGINT, repr(caught)
    assert stop.exit_code == 130
    assert "SIGINT received: stopping" in capsys.readouterr().out
