"""How the suite shares a small machine when pytest-xdist runs it on several workers (the
README's `pytest` does: `-n auto` in pyproject.toml).

Most of the slow tests wait far more than they compute (a server restarted after 60 s, a
node that must be noticed gone, a process group that must wind down), so a few workers
overlap those waits. Four rules keep that honest:

- **Timed tests run alone.** A test marked `timed` asserts a wall-clock bound that is only
  meaningful on an otherwise idle machine (the default run within 200 s, a 4-minute budget,
  a McNemar test under 1 s). Before such a test starts, every other worker finishes the test
  it is running and waits; the timed test then has the machine to itself. Writer-preferring
  file locks in a folder the workers share do this: the other workers take the machine lock
  shared for each test, a timed test takes it exclusive, and a second "intent" lock stops
  new shared holders from starving it.
- **A module stays on one worker** (its module-scoped Ray or server is started once), and the
  modules that share the session-scoped `served_pipeline` (one trained run behind a real
  `mlflow server`) share a worker, so that run is trained once. The fault tests have no
  fixture wider than a test: each of them is handed out on its own.
- **The longest work starts first** (`_SECONDS`, measured), so that no worker is left with a
  3-minute module when the others are done (longest-processing-time-first scheduling).
- **Each worker has its own Ray temp folder** (`RAY_TMPDIR`), so that a `ray.init()` or
  `ray start` of one test never finds another test's cluster through /tmp/ray.

The number of workers: `pytest_xdist_auto_num_workers` below. With `-n 0` none of this
applies and the suite runs serially in one process, as before.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

WORKER = os.environ.get("PYTEST_XDIST_WORKER")
RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")   # the same in every worker of a run
SERVED_PIPELINE_GROUP = "served_pipeline"
# Modules that use the session-scoped served_pipeline fixture (tests/e2e/conftest.py).
_SERVED = ("tests/e2e/test_serving.py", "tests/e2e/test_security.py", "tests/e2e/test_ui.py")
# Folders whose tests have no fixture wider than a test: each test may go to any worker.
_PER_TEST = ("tests/faults/",)
# Seconds each module took under `pytest -n 3` on 2 cores (2026-12-05, the sum of its tests'
# times; a module not named here takes under a minute). Only the order uses them.
_SECONDS = {
    "tests/faults/test_faults.py": 1022, "tests/faults/test_outage.py": 567,
    "tests/integration/test_bad_inputs.py": 450, "tests/faults/test_nodes.py": 411,
    "tests/integration/test_budget.py": 386, "tests/e2e/test_cluster.py": 241,
    "tests/integration/test_promotion.py": 240, "tests/integration/test_decoded_once.py": 184,
    "tests/integration/test_installed.py": 179, "tests/e2e/test_promote.py": 177,
    "tests/faults/test_disk.py": 128, "tests/integration/test_ddp_worker.py": 127,
    "tests/e2e/test_default_run.py": 124, "tests/faults/test_soak.py": 115,
    "tests/integration/test_search_features.py": 107,
    "tests/integration/test_review_search.py": 107, "tests/faults/test_extend.py": 107,
    "tests/e2e/test_serve_follow.py": 105, "tests/e2e/test_batch_predict.py": 87,
    "tests/integration/test_object_storage.py": 81, "tests/integration/test_pipeline.py": 79,
    SERVED_PIPELINE_GROUP: 121,   # its one trained run, then serving, security and the UI
}

if WORKER:
    # Before anything imports Ray; inherited by every command a test starts.
    os.environ["RAY_TMPDIR"] = f"/tmp/vt-{RUN[:8]}-{WORKER}"   # short: Ray's socket paths
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)


def _shared_folder(run: str) -> Path:
    return Path(f"/tmp/vt-{run[:8]}-locks")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one more worker than cores, at least 3, at most 8. The slow tests wait more
    than they compute (see the module docstring); each Ray cluster a test starts asks for 2
    CPUs whatever the machine has, so more workers than that only add contention."""
    return max(3, min(8, (os.cpu_count() or 2) + 1))


def _module(nodeid: str) -> str:
    return nodeid.split("::")[0]


def group_of(nodeid: str) -> str:
    """What must stay on one worker: the served-pipeline modules together, a fault test alone,
    any other test with its module."""
    path = _module(nodeid)
    if path in _SERVED:
        return SERVED_PIPELINE_GROUP
    return nodeid if path.startswith(_PER_TEST) else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduler with our groups. (Its `--dist loadgroup` marks do nothing with
    pytest 9.2: xdist 3.8 renames the tests through `item._nodeid`, which pytest 9.2 no longer
    reads, so every test was scheduled alone and module fixtures ran on every worker.)
    `_split_scope` is the method xdist's own LoadFileScheduling overrides for the same end."""
    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return Groups(config, log)


def pytest_collection_modifyitems(config, items):
    """The groups in decreasing expected time (xdist hands them out in this order, with
    `--no-loadscope-reorder`); the tests of a group keep their order."""
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(group_of(item.nodeid), []).append(item)
    per_module = Counter(_module(item.nodeid) for item in items)

    def expected(group: str) -> float:
        path = _module(groups[group][0].nodeid)
        return _SECONDS.get(group, _SECONDS.get(path, 0) / per_module[path])

    order = sorted(groups, key=expected, reverse=True)   # stable: ties keep collection order
    items[:] = [item for group in order for item in groups[group]]


class _MachineLock:
    """The writer-preferring shared/exclusive lock described in the module docstring."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.intent = open(folder / "machine.intent", "a+")   # noqa: SIM115 (held open)
        self.machine = open(folder / "machine.lock", "a+")    # noqa: SIM115

    def acquire(self, alone: bool) -> None:
        if alone:
            fcntl.flock(self.intent, fcntl.LOCK_EX)
            fcntl.flock(self.machine, fcntl.LOCK_EX)
        else:
            fcntl.flock(self.intent, fcntl.LOCK_SH)
            fcntl.flock(self.machine, fcntl.LOCK_SH)
            fcntl.flock(self.intent, fcntl.LOCK_UN)

    def release(self) -> None:
        fcntl.flock(self.machine, fcntl.LOCK_UN)
        fcntl.flock(self.intent, fcntl.LOCK_UN)


_lock: _MachineLock | None = None


_runs: set[str] = set()


def pytest_configure(config):
    global _lock
    if WORKER:
        _lock = _MachineLock(_shared_folder(RUN))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """In the controller, per worker started: the run id, to remove the lock folder at the end."""
    _runs.add(node.workerinput["testrunuid"])


def pytest_unconfigure(config):
    if WORKER:   # every command a test started has ended with its test
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    for run in _runs:
        shutil.rmtree(_shared_folder(run), ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Around each test's setup, call and teardown (module fixtures included)."""
    if _lock is None:
        yield
        return
    _lock.acquire(alone=item.get_closest_marker("timed") is not None)
    try:
        yield
    finally:
        _lock.release()
