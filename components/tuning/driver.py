"""The Tune driver: a function trainable per trial that creates the trial's MLflow child run
and trains the trial, in one of two ways the sweep's plan chooses (`components.tuning.plan`):

- in the trial's own process (`train_in_trial`): one worker, reused Tune actors, checkpoints
  reported to Tune, a failed trial retried by Tune from its last checkpoint;
- data-parallel: the trial builds a `TorchTrainer` (the same builder a single training run
  uses) and fits it; Train restarts its worker group from the last checkpoint, and Train's
  `TuneReportCallback` forwards rank 0's metrics to Tune. (Current Ray, Train V2, does not
  accept `Tuner(trainer)`: Tune launches Train from inside a function trainable.)

Both run the same training loop (`components.training.worker.run_training`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune
from ray.train import Checkpoint
from ray.tune.integration.ray_train import TuneReportCallback

from components import storage
from components.config import SearchConfig
from components.data.split import kfold_rows
from components.timing import mark
from components.tracking.server import is_unreachable
from components.training.checkpoint import recover_torn_run
from components.training.spec import TrainJob
from components.training.trainer import build_trainer
from components.training.worker import train_in_trial
from components.tuning.callbacks import (
    ConsoleProgress,
    StopOnRequest,
    SweepCallbacks,
    TrackingTarget,
    TrialRunCloser,
    live_callbacks,
)
from components.tuning.gate import (
    FamilyHalving,
    GatedLimiter,
    GatedVariantGenerator,
    SweepGate,
    TrialShape,
    ended_status,
    gate_for,
)
from components.tuning.plan import ResourcePlan
from components.tuning.seeded import SeededOptuna
from components.tuning.space import (
    TRIAL_SECTIONS,
    Axis,
    resolve_params,
    set_params,
    to_tune_space,
)
from components.tuning.sweep_state import repair_before_restore


@dataclass
class TrialResult:
    trial_id: str
    params: dict[str, Any]
    status: str                      # FINISHED | KILLED (stopped early) | FAILED
    run_id: str | None               # the trial's MLflow child run
    best_val_f1: float | None = None
    best_val_loss: float | None = None
    best_epoch: int | None = None
    epochs: int = 0
    checkpoint_path: str | None = None
    error: str | None = None
    history: dict[str, list[float]] = field(default_factory=dict)
    # k-fold CV: folds, best_fold, best_fold_val_f1 (best_val_f1 is then the folds' mean and
    # checkpoint_path the best fold's model)
    cv: dict[str, float] | None = None


CV_KEYS = ("cv_folds", "cv_best_fold", "cv_best_fold_val_f1", "cv_val_f1_std")


@dataclass
class SearchOutcome:
    trials: list[TrialResult]
    complete: bool   # False: the sweep was stopped before every trial ended (Ctrl-C, SIGTERM)
    disk_full: bool = False   # stopped because a trial had no space left for its checkpoint
    # stopped because the cluster no longer holds one trial: why (`SweepGate.halt`)
    cluster_lost: str | None = None


def _fit(job: TrainJob, name: str, storage_path: str, callbacks: list):
    mark("fit_start", trial=name)
    torn, intact = recover_torn_run(storage_path, name)
    if torn:   # Ray would fail this run at every restart: continue from what reads back
        print(f"visiontune: {name}: Ray Train's checkpoint list was torn (a full disk?); "
              f"continuing from {intact or 'the first epoch'}", flush=True)
        if intact is not None:
            fs, path = storage.resolve(intact)
            job = dataclasses.replace(job, resume_from=Checkpoint(path, filesystem=fs))
    try:
        return build_trainer(job, name=name, storage_path=storage_path,
                             callbacks=callbacks).fit()
    finally:
        mark("fit_end", trial=name)


def _cross_validate(job: TrainJob, trial_id: str, storage_path: str,
                    target: TrackingTarget | None, run_id: str | None) -> None:
    """k folds over train+val, one Train run each; the trial reports the folds' mean best
    val F1 to Tune, and the best fold's checkpoint for evaluation."""
    from statistics import mean, pstdev

    # copies and near-copies share a fold, as they share a split
    folds = kfold_rows(job.train_rows, job.val_rows, job.data.cv_folds, job.seed, job.group_keys)
    scores = []
    for i, (train_rows, val_rows) in enumerate(folds):
        fold_job = dataclasses.replace(job, train_rows=train_rows, val_rows=val_rows,
                                       metric_prefix=f"fold{i}/")
        result = _fit(fold_job, f"{trial_id}-fold{i}", storage_path, [])
        m = result.metrics or {}
        scores.append({"f1": m["best_val_f1"], "loss": m["best_val_loss"],
                       "epoch": m["epoch"], "best_epoch": m["best_epoch"],
                       "checkpoint_path": storage.uri_in(storage_path, result.checkpoint.path)})
    f1s = [s["f1"] for s in scores]
    best_fold = max(range(len(scores)), key=lambda i: (scores[i]["f1"], -scores[i]["loss"]))
    best = scores[best_fold]
    summary = {"best_val_f1": mean(f1s), "best_val_loss": mean(s["loss"] for s in scores),
               "cv_val_f1_std": pstdev(f1s), "epoch": max(s["epoch"] for s in scores),
               "best_epoch": best["best_epoch"], "early_stopped": 0,
               "cv_folds": len(scores), "cv_best_fold": best_fold,
               "cv_best_fold_val_f1": best["f1"]}
    if target is not None:
        target.tracker.log_metrics(run_id, {"cv_mean_val_f1": summary["best_val_f1"],
                                            "cv_std_val_f1": summary["cv_val_f1_std"],
                                            **{f"fold{i}/best_val_f1": f for i, f in
                                               enumerate(f1s)}})
    tune.report({**summary, "checkpoint_path": best["checkpoint_path"]})


def vt_trial(config: dict, job: TrainJob, axes: list[Axis], target: TrackingTarget | None,
             storage_path: str, in_trial: bool = False, shape: TrialShape | None = None):
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    mark("trial_start", trial=trial_id)
    base = {s: getattr(job, s) for s in TRIAL_SECTIONS}
    params = resolve_params(config, axes, base)
    if shape is not None and shape.epochs_of(config) != job.train.epochs:
        params["train.epochs"] = shape.epochs_of(config)  # the budget's plan for its family
    sections = set_params(base, params)
    run_id = None
    if target is not None:
        run_id = target.tracker.get_or_create_trial_run(
            target.experiment_id, target.parent_run_id, trial_id, ctx.get_trial_name(),
            params=params)
    mark("trial_run_ready", trial=trial_id)
    trial_job = dataclasses.replace(
        job, **sections, mlflow_run_id=run_id,
        log_augmented_samples=sections["augment"] != base["augment"])
    try:
        if trial_job.data.cv_folds:  # may itself be a searched parameter
            _cross_validate(trial_job, trial_id, storage_path, target, run_id)
        elif in_trial:
            train_in_trial(trial_job)
        else:
            _fit(trial_job, trial_id, storage_path, [TuneReportCallback()])
    except SystemExit:
        # Tune stopped the trial (a scheduler's decision, the sweep's end) at a report:
        # `TrialRunCloser` records how it ended.
        raise
    except BaseException:
        if target is not None:
            target.tracker.end_run_if_running(run_id, "FAILED")
        raise
    if target is not None:
        target.tracker.end_run(run_id, "FINISHED")
    mark("trial_end", trial=trial_id)


def _result_of(result, shape: TrialShape, run_ids: dict[str, str], axes: list[Axis],
               sections: dict, train_storage: str) -> TrialResult:
    m = result.metrics or {}
    # A Train run's checkpoint comes through TuneReportCallback's metrics; a trial that
    # trained itself reported its checkpoint to Tune.
    checkpoint = m.get("checkpoint_path") or (result.checkpoint.path if result.checkpoint
                                              else None)
    config = resolve_params(result.config or {}, axes, sections)
    trial_id = m.get("trial_id") or Path(result.path).name
    df = result.metrics_dataframe
    history = {}
    if df is not None and "val_f1" in df:
        history = {k: df[k].tolist() for k in ("val_f1", "val_loss", "train_loss") if k in df}
    epochs = int(m.get("epoch", 0) or 0)
    planned = shape.epochs_of(result.config or {})
    status = "FAILED" if result.error is not None else ended_status(m, planned)
    return TrialResult(
        trial_id=trial_id, params=dict(config), status=status, run_id=run_ids.get(trial_id),
        best_val_f1=m.get("best_val_f1"), best_val_loss=m.get("best_val_loss"),
        best_epoch=m.get("best_epoch"), epochs=epochs,
        checkpoint_path=storage.uri_in(train_storage, checkpoint),
        error=None if result.error is None else f"{type(result.error).__name__}: {result.error}",
        history=history, cv={k: m[k] for k in CV_KEYS if k in m} or None)


def build_search_alg(search: SearchConfig, axes: list[Axis], plan: ResourcePlan, seed: int,
                     name: str = "", seeds: tuple = (), keep_at: str | None = None):
    """The trial generator; both ask the sweep's gate (`components.tuning.gate`) before each
    new trial. `seeds`: (params, best val F1) of trials run before (an extended run's, or a
    warm start's), told to Optuna before it suggests anything; `keep_at`: the experiment
    folder where Tune's generator keeps a copy of the sweep's state (`sweep_state`)."""
    if search.algorithm == "optuna":
        return GatedLimiter(name, SeededOptuna(seeds, metric="best_val_f1", mode="max",
                                               seed=seed),
                            max_concurrent=plan.concurrent_trials)
    # The generator caps concurrency itself (Tune ignores max_concurrent_trials next to a
    # generator): trials never wait on each other's workers.
    return GatedVariantGenerator(name, keep_at, random_state=seed,
                                 max_concurrent=plan.concurrent_trials)


def build_trial_scheduler(search: SearchConfig, epochs: int, name: str = "",
                          shape: TrialShape | None = None):
    """`asha`: successive halving within each model family, which also holds a budgeted sweep
    to its deadline (`FamilyHalving`); `asha_global`: Tune's ASHA, every trial compared with
    every other at the same epoch."""
    if search.scheduler == "asha_global":
        from ray.tune.schedulers import ASHAScheduler

        # Rungs are counted in our own epoch counter: Tune's training_iteration restarts at 0
        # when a trial resumes from a checkpoint.
        return ASHAScheduler(time_attr="epoch", metric="val_f1", mode="max", max_t=epochs,
                             grace_period=min(search.grace_period, epochs),
                             reduction_factor=search.reduction_factor)
    if search.scheduler == "asha" or search.budget is not None:
        return FamilyHalving(name, shape)
    return None


@dataclass
class Launch:
    """The trials Tune launches: explicit grid points (repeats included) or a number of random
    draws (a budget's plan), else the config's; `cost`, a grid point's expected training
    time, launches the costliest first (`to_tune_space`)."""

    points: list[dict] | None = None
    num_samples: int | None = None
    cost: Callable[[dict], float] | None = None
    seeds: tuple = ()   # (params, best val F1) Optuna is told first (`SeededOptuna`)


def run_search(job: TrainJob, axes: list[Axis], search: SearchConfig, *, plan: ResourcePlan,
               storage_path: str, experiment_name: str, seed: int, gate: SweepGate,
               target: TrackingTarget | None = None, resume: bool = False,
               stop_requested: Callable[[], bool] = lambda: False,
               progress: ConsoleProgress | None = None,
               launch: Launch | None = None, earlier: tuple = ()) -> SearchOutcome:
    """Run (or, with `resume`, continue) the search until every trial ended, the gate closed
    and the running trials ended, or `stop_requested()` turned true; returns one result per
    trial, after the `earlier` ones (an extended run's, `earlier_trials`)."""
    sections = {s: getattr(job, s) for s in TRIAL_SECTIONS}
    shape = gate.shape
    train_storage = storage.join(storage_path, experiment_name, "train")
    # A trial that trains itself holds its worker's resources. A trial that drives a Train
    # run (whose workers hold the CPUs/GPUs) holds a token amount of a resource every node
    # has, so it never takes a CPU its workers wait for and needs nothing from the cluster's
    # nodes; the concurrency cap (build_search_alg) keeps trials from waiting on each
    # other's workers.
    resources = plan.trial_resources()
    trainable = tune.with_resources(
        tune.with_parameters(vt_trial, job=job, axes=axes, target=target,
                             storage_path=train_storage, in_trial=plan.in_trial, shape=shape),
        tune.PlacementGroupFactory([resources]) if plan.in_trial else resources)
    exp_path = storage.join(storage_path, experiment_name)
    # Trials at once follow what the live nodes hold; when they hold none, the sweep stops as
    # on a request (state saved, trials resumable): `components.tuning.cluster_watch`.
    gate.watch_cluster(plan)
    stopper = StopOnRequest(lambda: stop_requested() or gate.halt is not None)
    callbacks = [stopper, gate] + ([TrialRunCloser(target, shape)] if target is not None
                                   else []) + ([progress] if progress is not None else [])
    if resume:   # a full disk may have torn Tune's state while it was saved
        repair_before_restore(exp_path)
    if resume and tune.Tuner.can_restore(exp_path):
        # Finished trials keep their results; unfinished and errored ones run again and
        # their Train runs continue from their last checkpoints (same names, same storage).
        # The restored run config's SweepCallbacks call this process's callbacks.
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = _new_tuner(trainable, job, axes, search, plan, storage_path, experiment_name,
                           seed, shape, launch or Launch())
    mark("sweep_start", name=experiment_name)
    with live_callbacks(experiment_name, callbacks), gate_for(gate):
        grid = tuner.fit()
    mark("sweep_end", name=experiment_name)
    complete = not stopper.sent and grid.num_errors + grid.num_terminated == len(grid)
    run_ids = _trial_run_ids(target, wait=complete)
    trials = [_result_of(grid[i], shape, run_ids, axes, sections, train_storage)
              for i in range(len(grid))]
    return SearchOutcome([*earlier, *trials], complete, stopper.disk_full, gate.halt)


def earlier_trials(job: TrainJob, axes: list[Axis], storage_path: str, names: tuple[str, ...],
                   shape: TrialShape, target: TrackingTarget | None) -> list[TrialResult]:
    """The trials of finished sweeps `names` of this run, read from their Tune experiments
    (nothing runs): what an extension keeps."""
    sections = {s: getattr(job, s) for s in TRIAL_SECTIONS}
    runs = (target.tracker.until_up(lambda: target.tracker.child_runs(
        target.experiment_id, target.parent_run_id)) if names and target else [])
    run_ids = {r.data.tags.get("visiontune.trial_id", ""): r.info.run_id for r in runs}
    # how each ended as its own sweep recorded it (its plan's epochs, not this sweep's)
    ended = {r.data.tags.get("visiontune.trial_id", ""): r.info.status for r in runs
             if r.info.status in ("FINISHED", "KILLED", "FAILED")}
    trials = [_result_of(result, shape, run_ids, axes, sections,
                         storage.join(storage_path, name, "train"))
              for name, result in _finished_results(storage_path, names)]
    return [dataclasses.replace(t, status=ended.get(t.trial_id, t.status)) for t in trials]


def earlier_params(storage_path: str, names: tuple[str, ...], axes: list[Axis],
                   sections: dict) -> list[dict]:
    """The parameters each trial of finished sweeps `names` used (nothing runs, no MLflow)."""
    return [resolve_params(result.config or {}, axes, sections)
            for _, result in _finished_results(storage_path, names)]


def _finished_results(storage_path: str, names: tuple[str, ...]):
    """(sweep name, Tune result) of every trial of the finished sweeps `names`."""
    for name in names:
        fs, path = storage.resolve(storage.join(storage_path, name))
        grid = tune.ResultGrid(tune.ExperimentAnalysis(path, storage_filesystem=fs))
        for i in range(len(grid)):
            yield name, grid[i]


def _trial_run_ids(target: TrackingTarget | None, wait: bool) -> dict[str, str]:
    """Trial id -> its MLflow run. A server that is away is waited for (up to the journal's
    grace) only when the results will be used: a stopped sweep (Ctrl-C) must end now."""
    if target is None:
        return {}
    tracker = target.tracker

    def read() -> dict[str, str]:
        return {run.data.tags.get("visiontune.trial_id", ""): run.info.run_id
                for run in tracker.child_runs(target.experiment_id, target.parent_run_id)}
    if wait:
        return tracker.until_up(read)
    try:
        return read()
    except Exception as e:
        if is_unreachable(e):
            return {}
        raise


def _new_tuner(trainable, job: TrainJob, axes: list[Axis], search: SearchConfig,
               plan: ResourcePlan, storage_path: str, experiment_name: str, seed: int,
               shape: TrialShape, launch: Launch) -> tune.Tuner:
    sections = {s: getattr(job, s) for s in TRIAL_SECTIONS}
    scheduler = build_trial_scheduler(search, job.train.epochs, experiment_name, shape)
    param_space, num_samples = to_tune_space(
        axes, search.mode, sections, launch.num_samples or search.num_samples,
        search.max_trials, launch.cost, launch.points)
    if search.algorithm == "optuna":
        param_space.pop("grid_point", None)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            num_samples=num_samples,
            scheduler=scheduler,
            search_alg=build_search_alg(search, axes, plan, seed, experiment_name,
                                        launch.seeds, storage.join(storage_path,
                                                                   experiment_name)),
            # A reused actor saves a process start (and torch's imports) per trial. A trial
            # Tune stops ends at its next report, so a trial that trains itself can always
            # reuse; one that drives a Train run cannot with a scheduler that stops trials
            # (the reused actor would keep that Train run alive).
            reuse_actors=plan.in_trial or scheduler is None,
        ),
        run_config=tune.RunConfig(
            name=experiment_name,
            storage_path=storage_path,
            callbacks=[SweepCallbacks(experiment_name)],
            # A Train run's failures are retried by Ray Train from its checkpoints; a trial
            # that trains itself is retried by Tune from its last checkpoint. A trial process
            # that drives a Train run is retried by Tune too: it dies with its node (its Train
            # controller with it), and the Train run, same name and storage, continues from
            # its latest checkpoint. The sweep goes on when one trial fails for good.
            failure_config=tune.FailureConfig(max_failures=job.train.max_failures,
                                              fail_fast=False),
            # The latest checkpoint holds the resume state and the best weights.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=1,
        ),
    )
