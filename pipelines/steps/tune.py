"""The tune step: the sweep's plan on the cluster, and Ray Tune over the search space."""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

from components import storage
from components.config import Config
from pipelines.steps.common import Echo, SearchPlan

# ----------------------------------------------------------------------------- tune

def tune_trials(cfg: Config, plan: SearchPlan, manifest, record, echo: Echo = print, *,
                resume: bool = False, stop_requested: Callable[[], bool] = lambda: False):
    """The Ray Tune search, one Ray Train run per trial; returns a `SearchOutcome` whose
    `complete` is False when `stop_requested` ended it early."""
    from components.cluster import ray_session
    from components.training.trainer import worker_resources
    from components.training.worker import TrainJob
    from components.tuning.callbacks import ConsoleProgress, TrackingTarget
    from components.tuning.driver import run_search
    from components.tuning.plan import plan_sweep
    from pipelines.console import console

    with record.step("tune", echo):
        job = TrainJob(
            data=cfg.data, augment=cfg.augment, model=cfg.model, train=cfg.train,
            average=cfg.evaluation.average, seed=cfg.seed,
            train_rows=manifest.subset("train"), val_rows=manifest.subset("val"),
            num_classes=len(manifest.classes), tracking_uri=cfg.tracking.uri,
            decoded=manifest.decoded,
            group_keys=manifest.group_keys() if cfg.data.cv_folds else {})
        target = TrackingTarget(record.tracker, record.experiment_id, record.run_id)
        log_augmented_samples(cfg, manifest, record)
        log_path = ray_log_path(cfg, record.pipeline_id)
        if not console.verbose:
            echo(f"  Ray's and Tune's own output: {log_path} (--verbose shows it here)")
        progress = ConsoleProgress(echo, console.status, plan.axes, plan.base, cfg.train.epochs,
                                   plan.num_trials)
        sizes = model_sizes(cfg, plan)
        with console.ray_output_to(log_path), \
                ray_session(cfg.ray.address, cfg.ray.num_cpus) as resources:
            resource_plan = plan_sweep(
                resources, plan.num_trials, cfg.train.num_workers,
                worker_resources(cfg.train.cpus_per_worker, cfg.train.use_gpu,
                                 cfg.train.resources_per_worker),
                cfg.search.max_concurrent_trials, model_params=tuple(sizes.values()),
                k_fold=bool(cfg.data.cv_folds) or any(a.key == "data.cv_folds"
                                                      for a in plan.axes))
            job = dataclasses.replace(job, train=dataclasses.replace(
                job.train, num_workers=resource_plan.workers_per_trial))
            record.set_tags({"visiontune.plan.workers_per_trial":
                             resource_plan.workers_per_trial,
                             "visiontune.plan.trials_at_once": resource_plan.concurrent_trials,
                             "visiontune.plan.in_trial": resource_plan.in_trial,
                             "visiontune.plan.reason": resource_plan.reason})
            echo("  " + resource_plan.describe(cfg.train.epochs * max(cfg.data.cv_folds, 1)))
            echo(f"  search: {cfg.search.mode} with {cfg.search.algorithm}, scheduler "
                 f"{cfg.search.scheduler}" + (f", {cfg.data.cv_folds}-fold CV per trial"
                                              if cfg.data.cv_folds else ""))
            outcome = run_search(job, plan.axes, cfg.search, plan=resource_plan,
                                 storage_path=cfg.ray.storage_path,
                                 experiment_name=record.pipeline_id, seed=cfg.seed,
                                 target=target, resume=resume, stop_requested=stop_requested,
                                 progress=progress, cost=_trial_cost(cfg, sizes, resource_plan))
        counts = {s: sum(t.status == s for t in outcome.trials)
                  for s in ("FINISHED", "KILLED", "FAILED")}
        echo(f"  trials: {counts}" + ("" if outcome.complete else " (search stopped)"))
        if outcome.complete:
            record.log_metrics({f"trials_{k.lower()}": v for k, v in counts.items()})
            if log_path.is_file() and log_path.stat().st_size:
                record.log_artifact(log_path, "logs")  # beside the run, for its reviewers
        else:
            # The step is not done: a resumed run tunes again (Tune restores the sweep).
            raise SearchStopped(outcome)
    return outcome.trials


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
    from components.models import build_model

    names = {cfg.model.name}
    for axis in plan.axes:
        if axis.key == "model.name":
            names.update(axis.args if axis.kind in ("grid", "choice") else ())
    classes = 10  # the head's size barely moves the count; the data is not indexed yet here
    return {n: sum(p.numel() for p in build_model(dataclasses.replace(cfg.model, name=n),
                                                  classes, cfg.data.channels).parameters())
            for n in sorted(names)}


def log_augmented_samples(cfg: Config, manifest, record) -> None:
    """A grid of training images as the trials' models see them, on the parent run: once per
    pipeline instead of once per trial (a trial that searches the augmentation logs its own)."""
    import matplotlib.pyplot as plt

    from components.augment import build_train_transform, eval_preprocessing, plot_augmented_samples
    from components.data.dataset import load_image

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


class SearchStopped(Exception):
    """The search ended before every trial did."""

    def __init__(self, outcome):
        super().__init__("the search stopped before every trial ended")
        self.outcome = outcome
