"""A tracking server that goes away during a sweep: a real `mlflow server` killed mid-trial and
started again on the same port and store. The sweep rides the outage out (the run's processes
journal what they log, docs/faults.md) and the record read back through MlflowClient is the
one a sweep without an outage leaves.

The outage that is ridden out meets 2-worker DDP trials (rank 0 of each worker group
journals); the other cases train each trial in its Tune trial's process. The journal is the
same code in both (components/tracking/journal.py, opened by training/rank0.py); a run
without Ray Train's worker groups costs less than half the CPU, and the suite has 2 cores."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.faults.conftest import EPOCHS
from tests.faults.test_faults import (
    _assert_no_process_left,
    _pipeline_id,
    _until_no_trial_process,
)

pytestmark = [pytest.mark.slow, pytest.mark.faults]
OUTAGE_S = 60


def _journal(workspace, pipeline_id: str) -> list:
    return [p for p in (workspace.root / "ray_results" / pipeline_id / "journal").rglob(
        "*.json") if not p.name.startswith(".")]


def _epoch_times(workspace, run_id: str) -> list[float]:
    return [m.timestamp / 1000 for m in workspace.client().get_metric_history(run_id, "val_f1")]


def _server_killed_mid_training(workspace, mlflow_server, *overrides: str):
    """The command against the server, the server killed once a trial is mid-training:
    (the command, its parent run, its pipeline id)."""
    workspace.env["MLFLOW_TRACKING_URI"] = mlflow_server.uri
    run = workspace.start("run", "--config", str(workspace.config), *overrides)
    workspace.wait_for(workspace.a_trial_mid_training, run)
    parent = workspace.parent()
    mlflow_server.kill()
    return run, parent, parent.data.tags["visiontune.pipeline_id"]


def test_tracking_server_restarted_60s_later_the_sweep_rides_it_out(workspace, mlflow_server):
    run, parent, pipeline_id = _server_killed_mid_training(workspace, mlflow_server)
    down = time.time()
    time.sleep(OUTAGE_S)
    assert run.proc.poll() is None, run.output()[-3000:]   # still training, not stopped
    waiting = _journal(workspace, pipeline_id)
    mlflow_server.start()
    up = time.time()
    assert run.wait(timeout=600) == 0, run.output()[-4000:]
    out = run.output()

    assert waiting, "nothing was journaled during the outage"
    assert re.search(r"tracking server unreachable since \d\d:\d\d:\d\d: training continues, "
                     r"\d+ records waiting", out), out[-3000:]
    assert re.search(r"tracking server back after \d+ s: \d+ journaled records sent", out) or \
        re.search(r"\d+ journaled records sent to the tracking server", out), out[-3000:]
    workspace.assert_complete(parent.info.run_id)
    assert _journal(workspace, pipeline_id) == []   # everything was sent
    kids = workspace.children(parent.info.run_id)
    for kid in kids:
        assert set(kid.data.params) >= {"train.optimizer"}
        assert "visiontune.node_id" in kid.data.tags and "visiontune.trial_id" in kid.data.tags
    # Epochs trained while the server was away are in the record at the time they ended.
    during = [t for kid in kids for t in _epoch_times(workspace, kid.info.run_id)
              if down < t < up]
    assert during, [(_epoch_times(workspace, k.info.run_id)) for k in kids]
    final = workspace.client().get_run(parent.info.run_id)
    assert final.data.tags["visiontune.step.tune"] == "done"
    _assert_no_process_left(run.pid)


def test_driver_sigkilled_during_an_outage_then_resume_sends_the_journal_first(
        workspace_in_trial, mlflow_server):
    workspace = workspace_in_trial
    run, parent, pipeline_id = _server_killed_mid_training(workspace, mlflow_server)
    deadline = time.time() + 120
    while len(_journal(workspace, pipeline_id)) < 2 and time.time() < deadline:
        time.sleep(0.5)   # epochs trained during the outage, journaled
    assert _journal(workspace, pipeline_id), run.output()[-3000:]
    os.kill(run.pid, signal.SIGKILL)   # the driver dies, and its local Ray with it
    run.wait(timeout=30)
    _until_no_trial_process(run.pid)   # none journals an epoch behind the resume
    mlflow_server.start()
    assert workspace.versions() == []

    resumed = workspace.run("run", "--resume", pipeline_id)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert re.search(rf"\d+ journaled records of {pipeline_id} sent first", resumed.stdout)
    workspace.assert_complete(parent.info.run_id)   # every trial and epoch once, no gap
    assert _journal(workspace, pipeline_id) == []


def test_an_outage_longer_than_the_grace_stops_the_sweep_and_resume_sends_the_journal(
        workspace_in_trial, mlflow_server):
    workspace = workspace_in_trial
    run, parent, pipeline_id = _server_killed_mid_training(workspace, mlflow_server,
                                                           "tracking.outage_grace_s=20")
    killed = time.time()
    assert run.wait(timeout=300) == 1, run.output()[-4000:]
    assert time.time() - killed < 240
    last = run.output().strip().splitlines()[-1]
    assert last.startswith("visiontune: error: the MLflow tracking store stopped answering")
    pipeline_id = _pipeline_id(last)
    _assert_no_process_left(run.pid)

    mlflow_server.start()
    assert workspace.versions() == []
    resumed = workspace.run("run", "--resume", pipeline_id)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    workspace.assert_complete(parent.info.run_id)
    assert EPOCHS == len(workspace.epochs_logged(workspace.children(
        parent.info.run_id)[0].info.run_id))


def test_ctrl_c_during_an_outage_then_resume_once_the_server_is_back(workspace_in_trial,
                                                                    mlflow_server):
    """Ctrl-C to the process group while the server is away: the command stops as it does
    with a server (exit 130, one line, nothing registered); what it could not record goes to
    the journal, and `--resume ID` sends it first and finishes the record."""
    workspace = workspace_in_trial
    run, parent, pipeline_id = _server_killed_mid_training(workspace, mlflow_server)
    deadline = time.time() + 120
    while "tracking server unreachable since" not in run.output() and time.time() < deadline:
        time.sleep(0.5)
    assert "tracking server unreachable since" in run.output(), run.output()[-3000:]
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait(timeout=180) == 130, run.output()[-4000:]
    last = run.output().strip().splitlines()[-1]
    assert f"visiontune run --resume {pipeline_id}" in last, last
    _assert_no_process_left(run.pid)

    mlflow_server.start()
    assert workspace.versions() == []
    resumed = workspace.run("run", "--resume", pipeline_id)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    workspace.assert_complete(parent.info.run_id)
    assert _journal(workspace, pipeline_id) == []
