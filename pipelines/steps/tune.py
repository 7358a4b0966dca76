"""The tune step: the sweep's plan on the cluster, and Ray Tune over the search space."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from components import storage
from components.augment import build_train_transform, eval_preprocessing, plot_augmented_samples
from components.cluster import ray_session
from components.config import Config
from components.data.dataset import load_image
from components.data.split import SplitManifest
from components.durations import format_duration, parse_duration
from components.errors import UserError
from components.models import build_model
from components.training.spec import TrainJob
from components.training.trainer import worker_resources
from components.tuning import budget as b
from components.tuning.budget import BudgetPlan, planned_points
from components.tuning.callbacks import ConsoleProgress, TrackingTarget
from components.tuning.driver import Launch, TrialResult, earlier_trials, run_search
from components.tuning.gate import SweepGate, TrialShape
from components.tuning.plan import ResourcePlan, plan_sweep
from components.tuning.probe import probe_costs
from components.tuning.space import grid_points
from pipelines.console import console
from pipelines.steps.common import SearchPlan
from pipelines.steps.data import PreparedData
from pipelines.steps.extend import Extension, seeds_of, trials_left

log = logging.getLogger(__name__)   # the console's lines (pipelines/console.py)

# ----------------------------------------------------------------------------- tune

def tune_trials(cfg: Config, plan: SearchPlan, data: PreparedData, record, *,
                resume: bool = False,
                stop_requested: Callable[[], bool] = lambda: False,
                ext: Extension | None = None, seeds: tuple = ()) -> list[TrialResult]:
    """The Ray Tune search; returns the list of `TrialResult`s. Each trial trains in its own
    process or drives a Ray Train run, as the resource plan chooses. Raises `SearchStopped`
    when `stop_requested` ended it before every trial did. `ext`: the sweep of an extended
    run (`pipelines.steps.extend`), whose earlier trials come first in the list; `seeds`:
    another run's trials for Optuna (`--warm-start`)."""
    ext = ext or Extension(record.pipeline_id, 0)
    with record.step("tune" + ext.suffix):
        began = time.time()
        job = train_job(cfg, data, record)
        target = TrackingTarget(record.tracker, record.experiment_id, record.run_id)
        log_augmented_samples(cfg, data.manifest, record)
        log_path = ray_log_path(cfg, record.pipeline_id)
        if not console.verbose:
            log.info(f"  Ray's and Tune's own output: {log_path} (--verbose shows it here)")
        sizes = model_sizes(cfg, plan)
        with console.ray_output_to(log_path), \
                ray_session(cfg.ray.address, cfg.ray.num_cpus) as resources:
            resource_plan = plan_resources(cfg, plan, resources, sizes, plan.num_trials)
            # an extension's trials so far, each ended as its own sweep recorded it
            earlier = earlier_trials(job, plan.axes, cfg.ray.storage_path, ext.earlier,
                                     TrialShape.of(plan.axes, plan.base, cfg.train.epochs,
                                                   None, False, 0, 2), target)
            left = trials_left(cfg, plan, [t.params for t in earlier]) if ext.number else None
            budget = plan_budget_of(cfg, plan, job, resource_plan, record, began, resume, left)
            shape = TrialShape.of(plan.axes, plan.base, cfg.train.epochs, budget,
                                  cfg.search.scheduler == "asha", cfg.search.grace_period,
                                  cfg.search.reduction_factor, len(job.val_rows[0]))
            launch = launched_trials(cfg, plan, budget, shape, left)
            if launch["count"] != plan.num_trials:
                resource_plan = plan_resources(cfg, plan, resources, sizes, launch["count"])
            job = dataclasses.replace(job, train=dataclasses.replace(
                job.train, num_workers=resource_plan.workers_per_trial))
            record_plan(cfg, resource_plan, record)
            again = resume or ext.number > 0   # earlier attempts spent budget, left checkpoints
            gate = SweepGate(ext.experiment, shape, plan=budget,
                             deadline=None if budget is None else
                             began + budget_left(cfg, record, again) - budget.wind_down_s,
                             stop_at_f1=cfg.search.stop_at_f1,
                             stop_no_improvement=cfg.search.stop_no_improvement,
                             first_needs_one_epoch=not again)
            seeds = seeds or seeds_of(earlier)
            log.info(search_line(cfg, budget, len(seeds)))
            progress = ConsoleProgress(console.status, plan.axes, plan.base, shape,
                                       launch["count"])
            outcome = run_search(job, plan.axes, cfg.search, plan=resource_plan,
                                 storage_path=cfg.ray.storage_path,
                                 experiment_name=ext.experiment, seed=ext.seed(cfg.seed),
                                 gate=gate, target=target, resume=resume,
                                 stop_requested=stop_requested, progress=progress,
                                 launch=Launch(launch["points"], launch["num_samples"],
                                               None if budget else _trial_cost(cfg, sizes,
                                                                               resource_plan),
                                               seeds=seeds),
                                 earlier=tuple(earlier))
        counts = {s: sum(t.status == s for t in outcome.trials)
                  for s in ("FINISHED", "KILLED", "FAILED")}
        log.info(f"  trials: {counts}" + ("" if outcome.complete else " (search stopped)"))
        ended = time.time()
        # after the trials: Tune's state saved, Ray shut down (docs/performance.md)
        record.log_metrics({"sweep_seconds": ended - began, "sweep_wind_down_seconds":
                            ended - (gate.trials_ended or ended)})
        if outcome.complete:
            check_every_trial_ran(gate, launch["count"], len(outcome.trials) - len(earlier),
                                  log_path)
            record_sweep_end(record, gate, budget, launch["count"], outcome.trials,
                             time.time() - began, resource_plan.concurrent_trials)
            record.log_metrics({f"trials_{k.lower()}": v for k, v in counts.items()})
            if log_path.is_file() and log_path.stat().st_size:
                record.log_artifact(log_path, "logs")  # beside the run, for its reviewers
        else:
            # The step is not done: a resumed run tunes again (Tune restores the sweep).
            raise SearchStopped(outcome)
    return outcome.trials


def train_job(cfg: Config, data: PreparedData, record) -> TrainJob:
    """What every trial trains with, before a trial's own parameters are applied."""
    manifest = data.manifest
    return TrainJob(
        data=cfg.data, augment=cfg.augment, model=cfg.model, train=cfg.train,
        average=cfg.evaluation.average, seed=cfg.seed,
        train_rows=manifest.subset("train"), val_rows=manifest.subset("val"),
        num_classes=len(manifest.classes), tracker=record.tracker,
        decoded=data.stores, system_metrics_s=cfg.tracking.system_metrics_s,
        group_keys=manifest.group_keys() if cfg.data.cv_folds else {})


def record_plan(cfg: Config, resource_plan, record) -> None:
    """How the sweep uses the cluster, on the parent run's tags and the console."""
    record.set_tags({"visiontune.plan.workers_per_trial": resource_plan.workers_per_trial,
                     "visiontune.plan.trials_at_once": resource_plan.concurrent_trials,
                     "visiontune.plan.in_trial": resource_plan.in_trial,
                     "visiontune.plan.reason": resource_plan.reason})
    log.info("  " + resource_plan.describe(cfg.train.epochs * max(cfg.data.cv_folds, 1)))


def search_line(cfg: Config, budget, seeds: int = 0) -> str:
    """The console's line of what searches and what stops trials."""
    told = (f", told {seeds} earlier trials first" if seeds and cfg.search.algorithm == "optuna"
            else "")
    return (f"  search: {cfg.search.mode} with {cfg.search.algorithm}{told}, " + (
        "halving as the budget planned" if budget else f"scheduler {cfg.search.scheduler}")
        + (f", {cfg.data.cv_folds}-fold CV per trial" if cfg.data.cv_folds else "")
        + stop_rules(cfg.search))


def plan_resources(cfg: Config, plan: SearchPlan, resources, sizes: dict[str, int],
                   num_trials: int) -> ResourcePlan:
    """How `num_trials` trials use the cluster (`components.tuning.plan.plan_sweep`)."""
    return plan_sweep(
        resources, num_trials, cfg.train.num_workers,
        worker_resources(cfg.train.cpus_per_worker, cfg.train.use_gpu,
                         cfg.train.resources_per_worker),
        cfg.search.max_concurrent_trials, model_params=tuple(sizes.values()),
        k_fold=bool(cfg.data.cv_folds) or any(a.key == "data.cv_folds" for a in plan.axes))


BUDGET_TAG = "visiontune.budget.plan"


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
    import json

    if cfg.search.budget is None:
        return None
    saved = record.run().data.tags.get(BUDGET_TAG)
    if resume and saved:
        budget = b.from_json(json.loads(saved))
        log.info("  " + budget.describe().split("\n")[0] + " (the run's plan, kept on resume)")
        return budget

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


def check_every_trial_ran(gate, planned: int, ran: int, log_path: Path) -> None:
    """A sweep that ended with planned trials never started, and no rule of the gate that
    stopped them, lost them (Tune could not read its saved state back and started over):
    its record would say the grid was searched when it was not. Nothing is registered."""
    if gate.reason is None and ran < planned:
        raise TrialsLost(f"the sweep ended with {planned - ran} of its {planned} planned "
                         f"trial(s) never started and no rule stopped them (Tune's saved "
                         f"state of the sweep lost them; see {log_path}): nothing was "
                         f"registered; start the sweep over as a new run")


def _trial_cost(cfg: Config, sizes: dict[str, int], resource_plan):
    """With trials side by side, a grid point's expected cost (its model's parameters: the
    grid's models differ far more in time than anything else on it), so the costliest start
    first and no long trial is left running alone at the end; None when they run one at a
    time (the config's order is kept)."""
    if resource_plan.concurrent_trials < 2 or len(sizes) < 2:
        return None
    return lambda point: sizes.get(point.get("model.name", cfg.model.name), 0)


def model_sizes(cfg: Config, plan: SearchPlan) -> dict[str, int]:
    """The parameter count of each model the sweep trains (`model.name` and its searched
    values) by name, as built for this data: what the plan weighs data parallelism against."""
    names = {cfg.model.name}
    for axis in plan.axes:
        if axis.key == "model.name":
            names.update(axis.args if axis.kind in ("grid", "choice") else ())
    classes = 10  # the head's size barely moves the count; the data is not indexed yet here
    return {n: sum(p.numel() for p in build_model(dataclasses.replace(cfg.model, name=n),
                                                  classes, cfg.data.channels).parameters())
            for n in sorted(names)}


def log_augmented_samples(cfg: Config, manifest: SplitManifest, record) -> None:
    """A grid of training images as the trials' models see them, on the parent run: once per
    pipeline instead of once per trial (a trial that searches the augmentation logs its own)."""
    import matplotlib.pyplot as plt

    paths = manifest.subset("train")[0][:32]
    if not paths:
        return
    prep = eval_preprocessing(cfg.data, cfg.model)
    size, channels = cfg.data.image_size, cfg.data.channels
    transform = build_train_transform(cfg.augment.train, size, channels, prep["mean"],
                                      prep["std"], seed=cfg.seed)
    fig = plot_augmented_samples([load_image(p, channels, size) for p in paths], transform,
                                 prep["mean"], prep["std"], seed=cfg.seed)
    record.log_figure(fig, "augmented_samples.png")
    plt.close(fig)


def ray_log_path(cfg: Config, pipeline_id: str) -> Path:
    """Where Ray's and Tune's output goes: beside the run's checkpoints when they are local,
    else a local temporary folder (it is logged to the MLflow run as logs/ray.log either way)."""
    if not storage.is_uri(cfg.ray.storage_path):
        return Path(cfg.ray.storage_path) / pipeline_id / "ray.log"
    return Path(tempfile.gettempdir()) / "visiontune" / pipeline_id / "ray.log"


class TrialsLost(UserError):
    """The sweep ended without some of its planned trials and nothing decided so."""


class SearchStopped(Exception):
    """The search ended before every trial did."""
    def __init__(self, outcome):
        super().__init__("the search stopped before every trial ended")
        self.outcome = outcome
