"""The tune step: the sweep's plan on the cluster, and Ray Tune over the search space."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from components import storage
from components.augment import build_train_transform, eval_preprocessing, plot_augmented_samples
from components.cluster import ray_session
from components.config import Config
from components.data.dataset import load_image
from components.data.split import SplitManifest
from components.errors import UserError
from components.training.spec import TrainJob
from components.training.trainer import worker_resources
from components.tuning.budget import BudgetPlan
from components.tuning.callbacks import ConsoleProgress, TrackingTarget
from components.tuning.driver import (
    Launch,
    SearchOutcome,
    TrialResult,
    earlier_trials,
    run_search,
)
from components.tuning.gate import SweepGate, TrialShape
from components.tuning.plan import ResourcePlan, plan_sweep
from pipelines.console import console
from pipelines.steps.common import SearchPlan, model_sizes
from pipelines.steps.data import PreparedData
from pipelines.steps.extend import Extension, seeds_of, trials_left
from pipelines.steps.tune_budget import (
    RESTART_METRIC,
    budget_left,
    kept_without_restart,
    launched_trials,
    no_room_to_restart,
    plan_budget_of,
    record_sweep_end,
    restart_seconds,
    stop_rules,
    trial_shape,
)

log = logging.getLogger(__name__)   # the console's lines (pipelines/console.py)

# ----------------------------------------------------------------------------- tune

@dataclass
class Swept:
    """One attempt at the sweep, as its end records it (`_record_sweep`)."""

    outcome: SearchOutcome
    gate: SweepGate
    budget: BudgetPlan | None
    planned: int                 # the trials this sweep launches (an extension: its new ones)
    earlier: int = 0             # an extension's trials of earlier sweeps, first in the outcome
    slots: int = 1               # trials at once
    log_path: Path | None = None
    ray_s: float = 0.0           # starting or joining Ray


def tune_trials(cfg: Config, plan: SearchPlan, data: PreparedData, record, *,
                resume: bool = False,
                stop_requested: Callable[[], bool] = lambda: False,
                ext: Extension | None = None, seeds: tuple = ()) -> list[TrialResult]:
    """The Ray Tune search; returns the list of `TrialResult`s. Each trial trains in its own
    process or drives a Ray Train run, as the resource plan chooses. Raises `SearchStopped`
    when `stop_requested` ended it before every trial did. `ext`: the sweep of an extended
    run (`pipelines.steps.extend`), whose earlier trials come first in the list; `seeds`:
    another run's trials for Optuna (`--warm-start`). A resumed budgeted sweep whose budget
    left cannot hold a restart keeps its paused trials as they are (`tune_budget`)."""
    ext = ext or Extension(record.pipeline_id, 0)
    with record.step("tune" + ext.suffix):
        began = time.time()
        job = train_job(cfg, data, record)
        target = TrackingTarget(record.tracker, record.experiment_id, record.run_id)
        # an extension's trials so far, each ended as its own sweep recorded it
        earlier = earlier_trials(job, plan.axes, cfg.ray.storage_path, ext.earlier,
                                 TrialShape.of(plan.axes, plan.base, cfg.train.epochs,
                                               None, False, 0, 2), target)
        left = trials_left(cfg, plan, [t.params for t in earlier]) if ext.number else None
        why = no_room_to_restart(cfg, record) if resume else None
        kept = why and kept_without_restart(cfg, job, plan, record, target, ext.experiment,
                                            why, earlier, left)
        swept = (Swept(*kept, earlier=len(earlier)) if kept else
                 _sweep(cfg, plan, data, record, job, target, ext, began, earlier, left,
                        resume=resume, stop_requested=stop_requested, seeds=seeds))
        _record_sweep(record, swept, began)
    return swept.outcome.trials


def _sweep(cfg: Config, plan: SearchPlan, data: PreparedData, record, job: TrainJob,
           target: TrackingTarget, ext: Extension, began: float, earlier: list[TrialResult],
           left: dict | None, *, resume: bool, stop_requested: Callable[[], bool],
           seeds: tuple) -> Swept:
    """Ray Tune over the search space (`tune_trials`): plan, gate, run or restore."""
    log_augmented_samples(cfg, data.manifest, record)
    log_path = ray_log_path(cfg, record.pipeline_id)
    if not console.verbose:
        log.info(f"  Ray's and Tune's own output: {log_path} (--verbose shows it here)")
    sizes = model_sizes(cfg, plan)
    ray_began = time.time()
    with console.ray_output_to(log_path), \
            ray_session(cfg.ray.address, cfg.ray.num_cpus) as resources:
        ray_s = time.time() - ray_began
        resource_plan = plan_resources(cfg, plan, resources, sizes, plan.num_trials)
        budget = plan_budget_of(cfg, plan, job, resource_plan, record, began, resume, left)
        shape = trial_shape(cfg, plan, job, budget)
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
        progress = ConsoleProgress(console.status, plan.axes, plan.base, shape, launch["count"])
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
    return Swept(outcome, gate, budget, launch["count"], len(earlier),
                 resource_plan.concurrent_trials, log_path, ray_s)


def _record_sweep(record, swept: Swept, began: float) -> None:
    """The attempt's end on the console and the parent run; raises `SearchStopped` when the
    sweep was stopped before every trial ended (the step is not done: `--resume` tunes
    again, Tune restores the sweep)."""
    trials, gate = swept.outcome.trials, swept.gate
    counts = {s: sum(t.status == s for t in trials) for s in ("FINISHED", "KILLED", "FAILED")}
    log.info(f"  trials: {counts}" + ("" if swept.outcome.complete else " (search stopped)"))
    ended = time.time()
    # after the trials: Tune's state saved, Ray shut down (docs/performance.md)
    wind_down = ended - (gate.trials_ended or ended)
    record.log_metrics({"sweep_seconds": ended - began, "sweep_wind_down_seconds": wind_down})
    restart = restart_seconds(gate, swept.ray_s, wind_down)
    if restart is not None:
        record.log_metrics({RESTART_METRIC: restart})
    if not swept.outcome.complete:
        raise SearchStopped(swept.outcome)
    check_every_trial_ran(gate, swept.planned, len(trials) - swept.earlier, swept.log_path)
    record_sweep_end(record, gate, swept.budget, swept.planned, trials, time.time() - began,
                     swept.slots)
    record.log_metrics({f"trials_{k.lower()}": v for k, v in counts.items()})
    if swept.log_path and swept.log_path.is_file() and swept.log_path.stat().st_size:
        record.log_artifact(swept.log_path, "logs")  # beside the run, for its reviewers


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
