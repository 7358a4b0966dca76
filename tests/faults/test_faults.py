"""Real faults during a pipeline run, and the MLflow record each one must leave.

A sweep of 2 trials x 6 epochs on a generated 3-class folder, local Ray started by the
command, MLflow in ./mlflow.db of the command's cwd (or a real server). `workspace` trains
each trial with 2 DDP workers (a Ray Train worker group); `workspace_in_trial` with the
planner's choice here (each trial in its own Tune trial process, two side by side). A run of
worker groups costs twice the CPU of one without (86 against 39 CPU-seconds here): the faults
that reach into a worker group (a worker, the driver that owns the groups, Ctrl-C and SIGTERM
in both modes) use `workspace`, the rest `workspace_in_trial`."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from components.tuning.sweep_state import COPY_FILE
from tests.faults.conftest import EPOCHS, session_processes

pytestmark = [pytest.mark.slow, pytest.mark.faults]


def _pipeline_id(output: str) -> str:
    ids = re.findall(r"--resume (vt-[0-9a-z-]+)", output)
    assert ids, f"no resume hint in the output:\n{output[-3000:]}"
    return ids[-1]


def _driver_lines(output: str) -> str:
    """The command's own output, without the log lines Ray streams from its worker processes
    (`(TrainController pid=...) ...`): a Train controller killed while it starts workers logs
    Ray's own traceback there."""
    return "\n".join(line for line in output.splitlines()
                     if not re.match(r"^(\x1b\[\d+m)?\(\w+ pid=\d+", line))


def _assert_no_process_left(pid: int, timeout: float = 30) -> None:
    """Nothing the command started (local Ray, its workers) outlives it."""
    deadline = time.time() + timeout
    while session_processes(pid) and time.time() < deadline:
        time.sleep(1)
    assert session_processes(pid) == []


def _train_workers(parent_pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True)
    return [int(line.split()[0]) for line in out.stdout.splitlines()
            if int(line.split()[1]) == parent_pid and "RayTrainWorker" in line]


def _trial_processes(parent_pid: int) -> list[int]:
    """The Tune trial actors of the command (a trial that trains itself runs in one)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True)
    return [int(line.split()[0]) for line in out.stdout.splitlines()
            if int(line.split()[1]) == parent_pid and "ray::ImplicitFunc" in line]


def _until_no_trial_process(parent_pid: int, timeout: float = 30) -> None:
    """After the driver's SIGKILL: its local Ray takes its trial processes down within
    seconds; until then one may still log an epoch or write a checkpoint, behind a resume."""
    deadline = time.time() + timeout
    while _trial_processes(parent_pid) and time.time() < deadline:
        time.sleep(0.5)
    assert _trial_processes(parent_pid) == []


def _epochs_reported_to_tune(workspace, pipeline_id: str) -> list[list[int]]:
    """Per trial, the epochs in the order the trial reported them to Tune (result.json)."""
    found = []
    for f in sorted((workspace.root / "ray_results" / pipeline_id).glob("*/result.json")):
        found.append([json.loads(line)["epoch"] for line in f.read_text().splitlines()
                      if line.strip()])
    return found


@pytest.fixture(params=["workspace", "workspace_in_trial"])
def any_workspace(request):
    """Both ways a trial trains: a DDP worker group, or its own Tune trial process."""
    return request.getfixturevalue(request.param)


def test_sigkill_of_the_trial_process_that_trains_is_retried_from_its_checkpoint(
        workspace_in_trial):
    """Tune retries the trial in a new process from its last checkpoint: it goes on from the
    epoch after it (its reports to Tune never go back), and its MLflow history has every
    epoch exactly once."""
    ws = workspace_in_trial
    run = ws.start("run", "--config", str(ws.config), "search.space.train.optimizer={grid: [adam]}")
    kid = ws.wait_for(ws.a_trial_mid_training, run)
    trials = _trial_processes(run.pid)
    assert len(trials) == 1, trials
    os.kill(trials[0], signal.SIGKILL)
    assert run.wait(timeout=600) == 0, run.output()[-4000:]
    # the trial processes end with the command (within the grace every process here gets:
    # under load one was seen still exiting the instant the command returned)
    deadline = time.time() + 30
    while _trial_processes(run.pid) and time.time() < deadline:
        time.sleep(0.5)
    assert _trial_processes(run.pid) == []
    parent = ws.client().get_run(kid.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    assert ws.client().get_run(kid.info.run_id).info.status == "FINISHED"
    assert ws.epochs_logged(kid.info.run_id) == list(range(1, EPOCHS + 1))
    pipeline_id = parent.data.tags["visiontune.pipeline_id"]
    (reported,) = _epochs_reported_to_tune(ws, pipeline_id)
    assert reported == sorted(reported) and set(reported) == set(range(1, EPOCHS + 1)), reported
    # Tune's own record of the failure it retried
    (error,) = (ws.root / "ray_results" / pipeline_id).glob("*/error.txt")
    assert "Failure # 1" in error.read_text()
    assert [v.run_id for v in ws.versions()] == [parent.info.run_id]
    _assert_no_process_left(run.pid)


def test_sigkill_of_one_train_worker_mid_trial(workspace):
    """The worker group restarts from the last checkpoint: the trial finishes, and its
    val_f1 history has every epoch exactly once. (One trial is enough here.)"""
    # Twice the suite's epochs: under CI load one trial of 6 finished between two polls of
    # the store, before the test saw it mid-training.
    epochs = 2 * EPOCHS
    run = workspace.start("run", "--config", str(workspace.config),
                          "search.space.train.optimizer={grid: [adam]}", f"train.epochs={epochs}")
    kid = workspace.wait_for(functools.partial(workspace.a_trial_mid_training, epochs), run)
    workers = _train_workers(run.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    assert run.wait(timeout=600) == 0, run.output()[-4000:]
    parent = workspace.client().get_run(kid.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    assert workspace.client().get_run(kid.info.run_id).info.status == "FINISHED"
    assert workspace.epochs_logged(kid.info.run_id) == list(range(1, epochs + 1))
    assert [v.run_id for v in workspace.versions()] == [parent.info.run_id]
    _assert_no_process_left(run.pid)


def test_ctrl_c_then_resume_by_id_alone(any_workspace):
    workspace = any_workspace
    run = workspace.start("run", "--config", str(workspace.config))
    parent = workspace.wait_for(workspace.first_trial_finished, run)
    started = time.time()
    os.killpg(run.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert run.wait(timeout=120) == 130, run.output()[-4000:]
    assert time.time() - started < 90  # promptly, not after the sweep
    out = run.output()
    assert "Traceback" not in _driver_lines(out)
    pipeline_id = _pipeline_id(out)
    assert parent.data.tags["visiontune.pipeline_id"] == pipeline_id
    record = workspace.client().get_run(parent.info.run_id)
    assert record.info.status == "KILLED"
    workspace.assert_nothing_running(parent.info.run_id)
    assert workspace.versions() == []
    assert "visiontune.step.evaluate" not in record.data.tags
    _assert_no_process_left(run.pid)

    resumed = workspace.run("run", "--resume", pipeline_id)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    workspace.assert_readable_console(resumed.stdout)
    assert workspace.parent().info.run_id == parent.info.run_id  # the same run, not a new one
    workspace.assert_complete(parent.info.run_id)

    again = workspace.run("run", "--resume", pipeline_id)
    assert again.returncode == 0, again.stdout[-4000:]
    assert "already finished" in again.stdout
    assert len(workspace.versions()) == 1


def test_sigterm_ends_killed_with_nothing_running(any_workspace):
    workspace = any_workspace
    run = workspace.start("run", "--config", str(workspace.config))
    parent = workspace.wait_for(workspace.parent, run)
    workspace.wait_for(workspace.a_trial_mid_training, run)
    os.kill(run.pid, signal.SIGTERM)  # what `ray job stop` sends
    assert run.wait(timeout=120) == 143, run.output()[-4000:]
    assert "Traceback" not in _driver_lines(run.output())
    assert workspace.client().get_run(parent.info.run_id).info.status == "KILLED"
    workspace.assert_nothing_running(parent.info.run_id)
    assert workspace.versions() == []
    _assert_no_process_left(run.pid)


def test_sigkill_of_the_driver_then_resume(workspace):
    run = workspace.start("run", "--config", str(workspace.config))
    parent = workspace.wait_for(workspace.first_trial_finished, run)
    workspace.wait_for(workspace.a_trial_mid_training, run)
    os.kill(run.pid, signal.SIGKILL)  # a crash, an OOM kill: no handler runs
    run.wait(timeout=30)
    _until_no_trial_process(run.pid)
    # What the kill left: the parent still says RUNNING, nothing registered.
    assert workspace.client().get_run(parent.info.run_id).info.status == "RUNNING"
    assert workspace.versions() == []
    pipeline_id = parent.data.tags["visiontune.pipeline_id"]

    resumed = workspace.run("run", "--resume", pipeline_id)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    workspace.assert_complete(parent.info.run_id)


def _checkpoint_the_state_names(experiment: Path, trial_id: str) -> Path | None:
    """The checkpoint Tune's last saved state of the sweep names for a trial (the newest one it
    had registered then: `checkpoint_dir_name` of the trial's last result), read from the JSON
    Tune wrote, not through Tune."""
    for state_file in experiment.glob("experiment_state-*.json"):
        try:
            state = json.loads(state_file.read_text())
        except ValueError:   # torn by the kill mid-copy: the resume reads visiontune's copy
            with zipfile.ZipFile(experiment / COPY_FILE) as kept:
                state = json.loads(kept.read(state_file.name))
        for trial, runtime in state["trial_data"]:
            trial, runtime = json.loads(trial), json.loads(runtime)
            if trial["trial_id"] != trial_id:
                continue
            name = (runtime.get("last_result") or {}).get("checkpoint_dir_name")
            return experiment / trial["relative_logdir"] / name if name else None
    return None


def test_sigkill_of_the_driver_after_tune_deleted_the_checkpoint_its_state_names(
        workspace_in_trial):
    """Tune keeps one checkpoint per trial, deletes the older one as soon as the next is
    registered and saves its state of the sweep every 10 s or more: a driver killed in between
    leaves a state naming a deleted checkpoint (seen in CI; Tune then failed the trial at
    every restore). The kill is real. Tune saves its state every second here
    (TUNE_GLOBAL_CHECKPOINT_S) so that the state names a checkpoint of a trial still training
    when the driver dies; the race's outcome is then made certain by moving the checkpoint the
    state names to the next index, as Tune's next report and deletion would have (in CI the
    state had named none yet, and the test proved nothing).
    `--resume ID` puts the named checkpoint back and finishes the record."""
    ws = workspace_in_trial
    ws.env["TUNE_GLOBAL_CHECKPOINT_S"] = "1"
    run = ws.start("run", "--config", str(ws.config))

    def named_mid_training():
        kid = ws.a_trial_mid_training()
        experiment = ws.root / "ray_results" / ws.parent().data.tags["visiontune.pipeline_id"]
        named = _checkpoint_the_state_names(experiment, kid.data.tags["visiontune.trial_id"])
        return (kid, experiment) if named is not None and named.is_dir() else None

    kid, experiment = ws.wait_for(named_mid_training, run)
    parent = ws.parent()
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    _until_no_trial_process(run.pid)   # no trial process writes a checkpoint any more
    named = _checkpoint_the_state_names(experiment, kid.data.tags["visiontune.trial_id"])
    assert named is not None
    if named.is_dir():   # else the race happened for real
        newest = sorted(named.parent.glob("checkpoint_*"))[-1]
        named.rename(named.with_name(f"checkpoint_{int(newest.name.split('_')[1]) + 1:06d}"))

    resumed = ws.run("run", "--resume", parent.data.tags["visiontune.pipeline_id"])
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert f"{named.name} of {named.parent.name} was deleted after Tune last saved the sweep" \
        in resumed.stdout, resumed.stdout[-4000:]
    ws.assert_complete(parent.info.run_id)


def test_tracking_server_killed_mid_run_then_resume(workspace_in_trial, mlflow_server):
    """With tracking.outage_grace_s=0, a lost server stops the sweep at once (the outage is
    ridden out otherwise: test_outage.py). The driver watches the server, so how a trial
    trains does not matter here: the trials train in their own processes (cheaper)."""
    workspace = workspace_in_trial
    workspace.env["MLFLOW_TRACKING_URI"] = mlflow_server.uri
    run = workspace.start("run", "--config", str(workspace.config), "tracking.outage_grace_s=0")
    parent = workspace.wait_for(workspace.a_trial_mid_training, run)
    parent = workspace.parent()
    mlflow_server.kill()
    killed = time.time()
    code = run.wait(timeout=300)
    took = time.time() - killed
    out = run.output()
    assert code == 1, out[-4000:]
    assert took < 240, f"{took:.0f}s to give up"
    last = out.strip().splitlines()[-1]
    assert last.startswith("visiontune: error: the MLflow tracking store stopped answering")
    assert f"--resume {parent.data.tags['visiontune.pipeline_id']}" in last
    _assert_no_process_left(run.pid)

    mlflow_server.start()
    resumed = workspace.run("run", "--resume", parent.data.tags["visiontune.pipeline_id"])
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    workspace.assert_complete(parent.info.run_id)


def test_a_second_ctrl_c_stops_at_once(workspace):
    run = workspace.start("run", "--config", str(workspace.config))
    parent = workspace.wait_for(workspace.parent, run)
    workspace.wait_for(workspace.a_trial_mid_training, run)
    os.killpg(run.pid, signal.SIGINT)
    # Two signals before the handler runs are one to Python: send the second once the first
    # was handled (the wind-down it starts may take longer than this test waits).
    workspace.wait_for(lambda: "SIGINT received: stopping" in run.output(), run, poll=0.1)
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait(timeout=60) == 130, run.output()[-4000:]
    assert workspace.client().get_run(parent.info.run_id).info.status == "KILLED", \
        run.output()[-4000:]
    workspace.assert_nothing_running(parent.info.run_id)
    assert workspace.versions() == []
    _assert_no_process_left(run.pid)


def test_ctrl_c_of_a_budgeted_sweep_then_resume_keeps_the_plan_and_what_is_left(
        workspace_in_trial):
    """`--resume` of a sweep planned to `search.budget` trains the plan it made (no second
    probe) and only what is left of the budget: the attempts' sweep seconds add up to the
    budget plus one epoch at most. It restarts the paused trials only when what is left holds
    the restart the first attempt measured (docs/performance.md), a rule written out here:
    on an idle machine it restarts them; when the Ctrl-C comes late (a busy machine), Ray is
    not started, the trials keep their epochs and their runs stay KILLED."""
    ws, budget = workspace_in_trial, 90
    run = ws.start("run", "--config", str(ws.config), f"search.budget={budget}s")
    ws.wait_for(ws.a_trial_mid_training, run)
    # An epoch is in MLflow before its report reaches the driver, which measures the restart
    # to the first report it handles: Ctrl-C once Tune's driver wrote one (result.json).
    pipeline_id = ws.parent().data.tags["visiontune.pipeline_id"]
    ws.wait_for(lambda: any(_epochs_reported_to_tune(ws, pipeline_id)), run)
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait(timeout=120) == 130, run.output()[-4000:]
    first = run.output()
    assert "measuring one epoch of cnn" in first
    parent = ws.parent()
    plan = parent.data.tags["visiontune.budget.plan"]
    assert _pipeline_id(first) == pipeline_id
    client = ws.client()
    spent_first = sum(m.value for m in client.get_metric_history(parent.info.run_id,
                                                                 "sweep_seconds"))
    measured = client.get_metric_history(parent.info.run_id, "sweep_restart_seconds")
    assert len(measured) == 1, first[-3000:]   # a trial reported an epoch before the Ctrl-C
    restarts = budget - spent_first >= measured[0].value
    before = {k.info.run_name: ws.epochs_logged(k.info.run_id)
              for k in ws.children(parent.info.run_id)}

    resumed = ws.run("run", "--resume", pipeline_id)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "measuring one epoch" not in resumed.stdout
    assert "(the run's plan, kept on resume)" in resumed.stdout
    record = client.get_run(parent.info.run_id)
    assert record.data.tags["visiontune.budget.plan"] == plan
    spent = [m.value for m in client.get_metric_history(parent.info.run_id, "sweep_seconds")]
    assert len(spent) == 2
    epoch = json.loads(plan)["families"][0][4]
    assert sum(spent) <= budget + epoch + 5, (spent, measured[0].value, resumed.stdout[-3000:])
    kids = ws.children(parent.info.run_id)
    if restarts:
        assert "not restarted" not in resumed.stdout, resumed.stdout[-3000:]
        assert any(len(ws.epochs_logged(k.info.run_id)) > len(before.get(k.info.run_name, []))
                   for k in kids), resumed.stdout[-3000:]
    else:
        left = max(0.0, budget - spent_first)
        assert (f"not restarted: the budget's {left:.0f} s left would not hold a "
                f"restart") in resumed.stdout, resumed.stdout[-3000:]
        assert "Ray's and Tune's own output" not in resumed.stdout   # Ray never started
        assert {k.info.run_name: ws.epochs_logged(k.info.run_id) for k in kids} == before
        assert all(k.info.status == "KILLED" for k in kids)
        assert spent[1] < measured[0].value
    assert record.info.status == "FINISHED"
    ws.assert_nothing_running(parent.info.run_id)
    assert len(ws.versions()) == 1
