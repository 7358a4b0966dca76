"""The tune step's `search.budget`: its plan (measured once per run, kept on the parent run),
what earlier attempts left of it, and whether `--resume` can still restart the trials an
interruption paused.

A resumed budgeted sweep restarts its paused trials only when what is left of the budget holds
a restart as the last attempt measured it (`RESTART_METRIC`): starting or joining Ray, Tune's
loop up to the first epoch result of a trial (restoring, the trial's start, loading, one
epoch), and the sweep's wind-down. When it does not, nothing restarts: the paused trials keep
what their last checkpoint holds (their runs stay KILLED, as a trial the budget stops at an
epoch boundary) and the step ends there (`kept_without_restart`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

from ray import tune

from components import storage
from components.config import Config
from components.durations import format_duration, parse_duration
from components.training.spec import TrainJob
from components.tuning import budget as b
from components.tuning.budget import BudgetPlan, planned_points
from components.tuning.callbacks import TrackingTarget
from components.tuning.driver import SearchOutcome, earlier_trials
from components.tuning.gate import SweepGate, TrialShape
from components.tuning.plan import ResourcePlan
from components.tuning.probe import probe_costs
from components.tuning.space import grid_points
from components.tuning.sweep_state import repair_before_restore
from pipelines.steps.common import SearchPlan, model_sizes

log = logging.getLogger(__name__)   # the console's lines (pipelines/console.py)

BUDGET_TAG = "visiontune.budget.plan"
# what the attempt measured a restart of its sweep to take (module docstring), in seconds
RESTART_METRIC = "sweep_restart_seconds"


def stop_rules(search) -> str:
    rules = ([f"stop at val F1 {search.stop_at_f1:g}"] if search.stop_at_f1 else []) + (
        [f"stop after {search.stop_no_improvement} trials without a better val F1"]
        if search.stop_no_improvement else [])
    return f"; {', '.join(rules)}" if rules else ""


def plan_budget_of(cfg: Config, plan: SearchPlan, job: TrainJob, resource_plan: ResourcePlan,
                   record, began: float, resume: bool,
                   left: dict | None = None) -> BudgetPlan | None:
    """`search.budget`'s plan (`components.tuning.budget`): measured and chosen once per
    pipeline run and kept on the parent run, so a resumed run trains the same plan."""
    if cfg.search.budget is None:
        return None
    if resume and BUDGET_TAG in record.run().data.tags:
        return kept_plan(record)

    family_of = TrialShape(plan.axes, plan.base, cfg.train.epochs).family
    names = sorted(model_sizes(cfg, plan))
    se = cfg.search
    if se.mode == "random":
        wanted = left["count"] if left else se.num_samples
        demand = {n: max(1, wanted // len(names)) for n in names}
        draws = 1
    elif left is not None:   # an extension: the points its run has not run yet
        demand = {n: sum(family_of(p) == n for p in left["points"]) for n in names}
        names = [n for n in names if demand[n]] or names
        demand = {n: max(1, demand[n]) for n in names}
        draws = 1
    else:
        points = grid_points(plan.axes, se.mode, plan.base) or [{}]
        demand = {n: sum(family_of(p) == n for p in points) * se.num_samples for n in names}
        draws = se.num_samples
    log.info(f"  measuring one epoch of {', '.join(names)} ({resource_plan.concurrent_trials} "
             f"probe(s) at once) ...")
    # a data-parallel trial's probe holds one of its workers' resources
    costs = probe_costs(job, names, resource_plan.trial_resources() if resource_plan.in_trial
                        else resource_plan.per_worker, resource_plan.concurrent_trials)
    folds = max(1, cfg.data.cv_folds)
    if folds > 1:  # a k-fold trial trains every fold and reports once: no halving
        costs = {n: dataclasses.replace(c, epoch_s=c.epoch_s * folds) for n, c in costs.items()}
    # an extension plans what earlier sweeps of the run left of the (larger) budget
    seconds = budget_left(cfg, record, left is not None) - (time.time() - began)
    budget = b.plan_budget(
        seconds, resource_plan.concurrent_trials, demand, cfg.train.epochs, costs,
        first_rung=cfg.train.epochs if folds > 1 else min(se.grace_period, cfg.train.epochs),
        eta=se.reduction_factor,
        draws=draws, can_draw_more=any(not a.is_grid for a in plan.axes) and
        se.mode != "grid", max_trials=se.max_trials,
        devices="GPUs" if cfg.train.use_gpu else "CPUs",
        halve=se.scheduler == "asha" and folds == 1)
    # the whole step's budget and estimate: the probe's seconds are spent from it
    budget = dataclasses.replace(budget, budget_s=parse_duration(se.budget),
                                 estimate_s=budget.estimate_s + (time.time() - began))
    log.info("  " + budget.describe())
    record.set_tags({BUDGET_TAG: json.dumps(b.to_json(budget))})
    record.log_metrics({"budget_seconds": budget.budget_s,
                        "budget_estimate_seconds": budget.estimate_s})
    return budget


def kept_plan(record, say: bool = True) -> BudgetPlan:
    """The plan the run made (its parent run's tag), said on the console."""
    budget = b.from_json(json.loads(record.run().data.tags[BUDGET_TAG]))
    if say:
        log.info("  " + budget.describe().split("\n")[0] + " (the run's plan, kept on resume)")
    return budget


def budget_left(cfg: Config, record, resume: bool) -> float:
    """The budget minus what earlier attempts of this run spent in the sweep (their
    `sweep_seconds`): `--resume` keeps the remaining budget."""
    spent = 0.0
    if resume:
        spent = sum(m.value for m in record.tracker.metric_history(record.run_id,
                                                                   "sweep_seconds"))
    return max(0.0, parse_duration(cfg.search.budget) - spent)


def launched_trials(cfg: Config, plan: SearchPlan, budget, shape, left=None) -> dict:
    """What Tune launches: the budget's trials (grid points per family, or random draws), or
    the configured ones; an extension only what is `left` (`trials_left`)."""
    if budget is None:
        return left or {"points": None, "num_samples": None, "count": plan.num_trials}
    if cfg.search.mode == "random":
        return {"points": None, "num_samples": budget.trials, "count": budget.trials}
    points = left["points"] if left else grid_points(plan.axes, cfg.search.mode,
                                                     plan.base) or [{}]
    points = planned_points(budget, points, shape.family)
    return {"points": points, "num_samples": None, "count": len(points)}


def record_sweep_end(record, gate, budget, planned: int, trials, seconds: float,
                     slots: int) -> None:
    """Why the sweep ended and what stopping saved, on the console and the parent run."""
    not_started = max(0, planned - len(trials))
    why = gate.reason or "every planned trial ran"
    ran = [t for t in trials if t.epochs]
    line = f"  sweep: {format_duration(seconds)}"
    if budget is not None:
        line += (f" (budget {format_duration(budget.budget_s)}, estimate "
                 f"{format_duration(budget.estimate_s)})")
    line += f"; ended because {why}"
    saved = 0.0
    if not_started and gate.by_rule:
        mean = sum(gate.durations) / len(gate.durations) if gate.durations else 0.0
        saved = not_started * mean / max(1, slots)
        line += (f"; {not_started} planned trial(s) not started (about "
                 f"{format_duration(saved)} saved)")
    elif not_started:
        line += f"; {not_started} planned trial(s) not started"
    if gate.budget_stopped:
        line += f"; {gate.budget_stopped} trial(s) stopped at an epoch boundary by the budget"
    log.info(line)
    record.set_tags({"visiontune.sweep.ended_because": why})
    record.log_metrics({"trials_not_started": not_started, "sweep_seconds_saved": saved,
                        "trials_stopped_by_budget": gate.budget_stopped,
                        "trials_run": len(ran)})


def trial_shape(cfg: Config, plan: SearchPlan, job: TrainJob,
                budget: BudgetPlan | None) -> TrialShape:
    """Each trial's family and epochs as the sweep's plan (or the config) gives them."""
    return TrialShape.of(plan.axes, plan.base, cfg.train.epochs, budget,
                         cfg.search.scheduler == "asha", cfg.search.grace_period,
                         cfg.search.reduction_factor, len(job.val_rows[0]))


def restart_seconds(gate: SweepGate, ray_s: float, wind_down_s: float) -> float | None:
    """What this attempt took to get a trial to its first epoch result, plus its wind-down
    (module docstring); None when no trial reported an epoch."""
    if gate.first_result is None or gate.loop_began is None:
        return None
    return ray_s + (gate.first_result - gate.loop_began) + wind_down_s


def no_room_to_restart(cfg: Config, record) -> str | None:
    """Why `--resume` must not restart the paused trials of a budgeted sweep (what is left of
    the budget would not hold the restart the last attempt measured), or None."""
    if cfg.search.budget is None:
        return None
    measured = record.tracker.metric_history(record.run_id, RESTART_METRIC)
    if not measured:
        return None   # no trial of an earlier attempt reported an epoch: nothing to keep
    restart = sorted(measured, key=lambda m: (m.timestamp, m.step))[-1].value
    left = budget_left(cfg, record, True)
    if left >= restart:
        return None
    return (f"the budget's {format_duration(left)} left would not hold a restart of the "
            f"paused trials ({format_duration(restart)}, as the last attempt measured it)")


def kept_without_restart(cfg: Config, job: TrainJob, plan: SearchPlan, record,
                         target: TrackingTarget, experiment: str, why: str,
                         earlier: list, left: dict | None,
                         ) -> tuple[SearchOutcome, SweepGate, BudgetPlan, int] | None:
    """The sweep `experiment` as its interruption left it, read from Tune's saved state (no
    Ray, nothing trains): (the outcome, after an extension's `earlier` trials; the closed
    gate; the plan; the trials planned), or None when Tune saved no state of it. A trial that
    never reported stays out, as not started."""
    exp_path = storage.join(cfg.ray.storage_path, experiment)
    repair_before_restore(exp_path)   # a full disk may have torn Tune's state while it was saved
    if not tune.Tuner.can_restore(exp_path):
        return None
    budget = kept_plan(record, say=False)
    shape = trial_shape(cfg, plan, job, budget)
    trials = [t for t in earlier_trials(job, plan.axes, cfg.ray.storage_path, (experiment,),
                                        shape, target) if t.run_id or t.epochs]
    if not any(t.epochs for t in trials):
        return None   # nothing would be registered: a restart is the only way to a model
    for t in trials:   # a run the interruption could not close (a driver SIGKILLed)
        target.tracker.close_trial_run(target.experiment_id, target.parent_run_id,
                                       t.trial_id, t.status)
    kept_plan(record)
    gate = SweepGate(experiment, shape, plan=budget)
    gate.close(why)
    gate.budget_stopped = sum(t.status == "KILLED" for t in trials)
    log.info(f"  not restarted: {why}; {gate.budget_stopped} paused trial(s) kept at their "
             f"last checkpoint")
    planned = launched_trials(cfg, plan, budget, shape, left)["count"]
    return SearchOutcome([*earlier, *trials], complete=True), gate, budget, planned
