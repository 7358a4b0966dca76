"""How the suite shares a small machine when pytest-xdist runs it on several workers (the
README's `pytest` does: `-n auto` in pyproject.toml).

Most of the slow tests wait far more than they compute (a server restarted after 60 s, a
node that must be noticed gone, a process group that must wind down), so a few workers
overlap those waits. Four rules keep that honest:

- **Timed tests run first, alone.** A test marked `timed` asserts a wall-clock bound that is
  only meaningful on an otherwise idle machine (the default run within 200 s, a McNemar test
  under 1 s, the served model's bounded decoding). A module's timed tests form a group of
  their own, and the timed groups are handed out first. A timed test takes an exclusive file
  lock in a folder the workers share (held across consecutive timed tests of one worker) and
  leaves a mark there when it ends; every other test waits until all the marks are there.
  Since a worker receives its groups in order, it never holds another test before a timed
  one, so that wait never waits on itself. No timed test waits for a 3-minute fault test to
  drain, and none runs beside one. (The first version took the lock per test, timed tests
  wherever they fell: each waited for the other workers' running tests to end while new
  ones were held back, and those drains left the cores idle for minutes in CI.)
- **A module stays on one worker** (its module-scoped Ray or server is started once; its
  timed tests apart, which therefore use no module fixture of its other tests), and the
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
import hashlib
import json
import os
import shutil
import time
import warnings
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
# Seconds each module took under `pytest -n 3` on 2 cores (2026-12-06 at 868af98, the sum of
# its tests' times; a module not named here takes under a minute). Only the order uses them.
_SECONDS = {
    "tests/faults/test_faults.py": 1450, "tests/faults/test_outage.py": 1056,
    "tests/faults/test_nodes.py": 773, "tests/e2e/test_cluster.py": 575,
    "tests/integration/test_budget.py": 547, "tests/e2e/test_promote.py": 421,
    "tests/faults/test_disk.py": 402, "tests/faults/test_soak.py": 296,
    "tests/e2e/test_serve_follow.py": 275, "tests/integration/test_object_storage.py": 274,
    "tests/integration/test_bad_inputs.py": 251, "tests/e2e/test_batch_predict.py": 245,
    "tests/integration/test_decoded_once.py": 191,
    "tests/integration/test_review_search.py": 186, "tests/faults/test_extend.py": 185,
    "tests/integration/test_search_features.py": 163,
    "tests/integration/test_installed.py": 152, "tests/e2e/test_default_run.py": 146,
    "tests/integration/test_promotion.py": 137, "tests/integration/test_ddp_worker.py": 129,
    "tests/integration/test_pipeline.py": 121,
    SERVED_PIPELINE_GROUP: 298,   # its one trained run, then serving, security and the UI
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


def group_of(nodeid: str, timed: bool = False) -> str:
    """What must stay on one worker: a module's timed tests together (apart from its other
    tests), the served-pipeline modules together, a fault test alone, any other test with its
    module."""
    path = _module(nodeid)
    if timed:
        return f"{path}::timed"
    if path in _SERVED:
        return SERVED_PIPELINE_GROUP
    return nodeid if path.startswith(_PER_TEST) else path


def _timed_file(run: str) -> Path:
    return _shared_folder(run) / "timed.json"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduler with our groups. (Its `--dist loadgroup` marks do nothing with
    pytest 9.2: xdist 3.8 renames the tests through `item._nodeid`, which pytest 9.2 no longer
    reads, so every test was scheduled alone and module fixtures ran on every worker.)
    `_split_scope` is the method xdist's own LoadFileScheduling overrides for the same end.
    The controller sees test ids only: which are timed, the workers wrote when they collected
    (`timed.json`); it splits once every worker has collected."""
    from xdist.scheduler import LoadScopeScheduling

    class Groups(LoadScopeScheduling):
        timed: set[str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.timed is None:
                self.timed = set(json.loads(_timed_file(next(iter(_runs))).read_text()))
            return group_of(nodeid, nodeid in self.timed)

    return Groups(config, log)


_timed_ids: list[str] = []
_runs: set[str] = set()
_holding = False          # this worker holds the timed lock (across consecutive timed tests)
_lock_file = None         # that lock's file, on a pytest-xdist worker
# How long an untimed test waits for the timed ones at most: a worker that crashed mid-test
# never leaves its mark, and the suite must go on (with a warning) rather than hang.
TIMED_PHASE_LIMIT_S = 30 * 60


def _timed(item) -> bool:
    return item.get_closest_marker("timed") is not None


@pytest.hookimpl(trylast=True)   # after `-k`/`-m` have deselected: only what runs counts
def pytest_collection_modifyitems(config, items):
    """The timed groups first, then the others, each in decreasing expected time (xdist
    hands them out in this order, with `--no-loadscope-reorder`): a worker then never holds
    another test before a timed one, so waiting for the timed tests cannot wait on itself.
    The tests of a group keep their order."""
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(group_of(item.nodeid, _timed(item)), []).append(item)
    per_module = Counter(_module(item.nodeid) for item in items)

    def expected(group: str) -> float:
        path = _module(groups[group][0].nodeid)
        return _SECONDS.get(group, _SECONDS.get(path, 0) / per_module[path])

    # stable: ties keep collection order
    order = sorted(groups, key=lambda g: (not g.endswith("::timed"), -expected(g)))
    items[:] = [item for group in order for item in groups[group]]
    _timed_ids[:] = [item.nodeid for item in items if _timed(item)]
    if WORKER:   # for the controller's scheduler; every worker writes the same list
        part = _timed_file(RUN).with_suffix(f".{WORKER}")
        part.write_text(json.dumps(_timed_ids))
        part.replace(_timed_file(RUN))


def _mark(nodeid: str) -> Path:
    return _shared_folder(RUN) / "timed-done" / hashlib.sha1(nodeid.encode()).hexdigest()


def _wait_for_the_timed_tests() -> None:
    deadline = time.monotonic() + TIMED_PHASE_LIMIT_S
    while not all(_mark(nodeid).exists() for nodeid in _timed_ids):
        if time.monotonic() > deadline:
            warnings.warn(f"tests/scheduling.py: the timed tests did not all end within "
                          f"{TIMED_PHASE_LIMIT_S} s; the other tests go on beside them")
            break
        time.sleep(0.5)
    _timed_ids.clear()   # waited for once per worker


def pytest_configure(config):
    global _lock_file
    if WORKER:
        (_shared_folder(RUN) / "timed-done").mkdir(parents=True, exist_ok=True)
        _lock_file = open(_shared_folder(RUN) / "timed.lock", "a+")   # noqa: SIM115 (held)


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
    """Around each test's setup, call and teardown (module fixtures included): a timed test
    holds the timed lock and leaves its mark; any other test first waits for every mark."""
    global _holding
    if _lock_file is None:
        yield
        return
    if not _timed(item):
        if _timed_ids:
            _wait_for_the_timed_tests()
        yield
        return
    if not _holding:
        fcntl.flock(_lock_file, fcntl.LOCK_EX)
        _holding = True
    try:
        yield
    finally:
        _mark(item.nodeid).touch()
        if nextitem is None or not _timed(nextitem):
            fcntl.flock(_lock_file, fcntl.LOCK_UN)
            _holding = False
