"""A sweep that fits the time it is given, and one that stops when the answer is in, through
the real `visiontune` command (its own local Ray, SQLite MLflow in a temp dir), checked
through `MlflowClient`: the wall time, why the sweep ended, and every trial's record."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import cli_env, make_image_folder, stop_group

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _run(tmp: Path, *args: str, timeout: float = 900) -> tuple[int, str, float]:
    """`visiontune run ARGS` in `tmp` as a user types it: (exit code, output, wall seconds)."""
    log = tmp / "run.log"
    began = time.monotonic()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "visiontune"), "run", *args,
         f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"ray.storage_path={tmp}/ray_results",
         "ray.num_cpus=2"],
        cwd=tmp, env=cli_env(), start_new_session=True, stdout=open(log, "w"),
        stderr=subprocess.STDOUT)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        stop_group(proc)
    return code, log.read_text(), time.monotonic() - began


def _record(tmp: Path):
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("visiontune")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


def _exact_history(client, child, planned_epochs: int) -> int:
    """Every epoch the trial ran logged once, in order; FINISHED trials ran their planned
    epochs (or stopped themselves), KILLED ones fewer."""
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_f1")]
    assert steps == list(range(1, len(steps) + 1)), steps
    if child.info.status == "KILLED":
        assert 1 <= len(steps) < planned_epochs
    return len(steps)


def _longest_epoch(tmp: Path) -> float:
    """The longest epoch any trial took, as Tune recorded it (`time_this_iter_s` in each
    trial's result.json): on a busy machine an epoch takes longer than the probe measured."""
    return max((json.loads(line)["time_this_iter_s"]
                for f in (tmp / "ray_results").rglob("result.json")
                for line in f.read_text().splitlines() if line.strip()), default=0.0)


def _assert_within(metrics: dict, budget: float, epoch: float, out: str, tmp: Path) -> None:
    """docs/performance.md: the trials end within the budget plus, at worst, one epoch (the
    plan's estimate of one, or the longest one the trials actually took); the sweep's
    wind-down after them (Tune's state, Ray's shutdown) is recorded apart."""
    wind_down = metrics["sweep_wind_down_seconds"]
    assert 0 < wind_down < 30, (wind_down, out[-3000:])
    epoch = max(epoch, _longest_epoch(tmp))
    assert metrics["sweep_seconds"] - wind_down <= budget + epoch, (
        metrics["sweep_seconds"], wind_down, epoch, out[-3000:])


def _planned_epochs(parent, child, default: int) -> int:
    plan = json.loads(parent.data.tags["visiontune.budget.plan"])
    family = child.data.params.get("model.name", "cnn")
    by_family = {f[0]: f[2] for f in plan["families"]}
    return int(child.data.params.get("train.epochs", by_family.get(family, default)))


def test_the_course_comparison_fits_a_four_minute_budget(tmp_path):
    """The issue's check: 16 trials of the course comparison with search.budget=4m end within
    the budget plus one epoch (docs/performance.md), exit 0, nothing
    RUNNING, every trial FINISHED or KILLED with an exact history, one version registered;
    the plan's estimate and the outcome recorded. Not `timed`: the gate holds the sweep to
    the budget with the epoch times it measures, on a busy machine as on an idle one (a busy
    one runs fewer epochs)."""
    code, out, wall = _run(tmp_path, "--config",
                           str(REPO / "conf/experiment/course_comparison.yaml"),
                           "search.budget=4m")
    assert code == 0, out[-4000:]
    client, parent, children = _record(tmp_path)
    m = parent.data.metrics
    epoch = max(f[4] for f in json.loads(parent.data.tags["visiontune.budget.plan"])["families"])
    _assert_within(m, 240, epoch, out, tmp_path)
    assert m["budget_seconds"] == 240
    assert 0 < m["budget_estimate_seconds"] <= 240
    assert parent.data.tags["visiontune.sweep.ended_because"]
    assert "budget 4 min on 2 CPUs" in out and "estimate" in out
    assert parent.info.status == "FINISHED"
    assert children and all(c.info.status in ("FINISHED", "KILLED") for c in children)
    for child in children:
        _exact_history(client, child, _planned_epochs(parent, child, 5))
    assert len(client.search_model_versions("name = 'visiontune-classifier'")) == 1
    assert m["trials_finished"] + m["trials_killed"] == len(children)


def test_a_tight_budget_holds_the_trials_and_says_when_the_gate_stopped_them(tmp_path):
    """A tight budget (45 s, most of it spent starting Ray and probing): the plan fills it, the
    trials end within the budget plus one epoch, every trial FINISHED or KILLED with its
    epochs intact, and the best trial that ran is registered. Where the probe's estimate was
    optimistic, the gate acts: trials not started, or one stopped at an epoch boundary, and
    the run says the budget ended it; otherwise every planned trial ran. Which of the two
    happens follows the estimate's error on the machine (both were seen on this one; the
    gate's rule itself is unit-tested in tests/unit/test_budget.py). Not `timed`, as
    above."""
    data = make_image_folder(tmp_path / "images", per_class=60, corrupt=False, size=32)
    budget = 45
    code, out, wall = _run(
        tmp_path, f"data.path={data}", "data=folder", "data.image_size=32", "augment=none",
        "search=quick", "train.epochs=40", "train.patience=0", "train.batch_size=8",
        "search.num_samples=3", f"search.budget={budget}s",
        "search.space={train.optimizer: {grid: [adam, sgd_momentum]}, "
        "train.lr: {loguniform: [0.0005, 0.005]}}", "search.mode=grid+random")
    assert code == 0, out[-4000:]
    client, parent, children = _record(tmp_path)
    m = parent.data.metrics
    plan = json.loads(parent.data.tags["visiontune.budget.plan"])
    _assert_within(m, budget, plan["families"][0][4], out, tmp_path)
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children)
    for child in children:
        _exact_history(client, child, _planned_epochs(parent, child, 40))
    ended = parent.data.tags["visiontune.sweep.ended_because"]
    gate_acted = m["trials_stopped_by_budget"] + m["trials_not_started"] >= 1
    assert ("budget" in ended) == gate_acted, (ended, m)
    assert gate_acted or ended == "every planned trial ran", (ended, out[-3000:])
    assert len(client.search_model_versions("name = 'visiontune-classifier'")) == 1


def _random_search(tmp_path, *rules: str):
    data = make_image_folder(tmp_path / "images", per_class=30, corrupt=False)
    code, out, _ = _run(
        tmp_path, f"data.path={data}", "data=folder", "data.image_size=16", "augment=none",
        "search.mode=random", "search.num_samples=12", "search.budget=null", "train.epochs=2",
        "train.patience=0",
        "train.batch_size=8", "model.cnn.channels=[8,16]",
        "search.space={train.lr: {loguniform: [0.0001, 0.01]}, "
        "model.dropout: {uniform: [0.0, 0.5]}}", *rules)
    assert code == 0, out[-4000:]
    return out, _record(tmp_path)


def test_stop_no_improvement_ends_a_twelve_trial_search_early_and_says_why(tmp_path):
    out, (client, parent, children) = _random_search(tmp_path,
                                                     "search.stop_no_improvement=2")
    reason = parent.data.tags["visiontune.sweep.ended_because"]
    assert "2 finished trials in a row did not beat the best val F1" in reason
    assert "ended because 2 finished trials in a row" in out
    assert len(children) < 12
    assert parent.data.metrics["trials_not_started"] == 12 - len(children)
    assert parent.data.metrics["sweep_seconds_saved"] > 0
    # Independently of the code's bookkeeping: in the order trials ended, some K=2 in a row
    # did not beat the best before them.
    ended = sorted(children, key=lambda c: c.info.end_time)
    best, streak, hit = None, 0, False
    for c in ended:
        f1 = c.data.metrics["best_val_f1"]
        if best is None or f1 > best:
            best, streak = f1, 0
        else:
            streak += 1
            hit = hit or streak >= 2
    assert hit
    assert all(c.info.status == "FINISHED" for c in children)  # running trials finished


def test_stop_at_f1_starts_no_trial_once_one_reaches_it(tmp_path):
    out, (client, parent, children) = _random_search(tmp_path, "search.stop_at_f1=0.5")
    reason = parent.data.tags["visiontune.sweep.ended_because"]
    assert "search.stop_at_f1=0.5" in reason and "ended because a trial reached" in out
    assert len(children) < 12
    reached = [c for c in children if max(
        m.value for m in client.get_metric_history(c.info.run_id, "val_f1")) >= 0.5]
    assert reached
    # no trial started after the first one reached it ended... at most the ones running then
    first = min(c.info.end_time for c in reached)
    assert sum(c.info.start_time > first for c in children) == 0
