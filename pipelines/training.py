"""The training pipeline: ingest -> validate -> split -> tune -> evaluate -> register.

Composition only: each step is a component function with typed inputs and outputs; this
module wires them, records each step on the MLflow parent run and prints progress.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from components.config import Config, to_dict


@dataclass
class PipelineResult:
    pipeline_id: str
    parent_run_id: str
    best_params: dict
    best_val_f1: float
    test_metrics: dict[str, float]
    model_uri: str
    registered_name: str
    registered_version: str
    aliases: tuple[str, ...]
    tracking_uri: str
    num_trials: int
    wall_seconds: float


def new_pipeline_id() -> str:
    return time.strftime("vt-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def mlflow_ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


class _Steps:
    """Marks each step on the parent run (tag visiontune.step.<name>) and times it."""

    def __init__(self, tracker, run_id: str, echo: Callable[[str], None]):
        self.tracker, self.run_id, self.echo = tracker, run_id, echo

    def __call__(self, name: str):
        return _Step(self, name)


class _Step:
    def __init__(self, steps: _Steps, name: str):
        self.steps, self.name = steps, name

    def __enter__(self):
        self.start = time.time()
        self.steps.echo(f"[visiontune] {self.name} ...")
        self.steps.tracker.set_tags(self.steps.run_id, {f"visiontune.step.{self.name}": "running"})
        return self

    def __exit__(self, exc_type, exc, tb):
        status = "failed" if exc_type else "done"
        secs = time.time() - self.start
        self.steps.tracker.set_tags(self.steps.run_id, {f"visiontune.step.{self.name}": status})
        self.steps.tracker.log_metrics(self.steps.run_id, {f"step_seconds_{self.name}": secs})
        self.steps.echo(f"[visiontune] {self.name} {status} in {secs:.1f}s")
        return False


def run_training_pipeline(cfg: Config, *, resume: str | None = None,
                          echo: Callable[[str], None] = print,
                          extra_tags: dict[str, str] | None = None) -> PipelineResult:
    # Heavy imports here, not at module import: `visiontune --help` stays fast.
    import matplotlib.pyplot as plt
    import torch

    from components.augment import eval_preprocessing
    from components.data import (
        index_images,
        split_dataset,
        validate_images,
        write_digits_folder,
    )
    from components.data.split import min_images_per_class
    from components.evaluation import (
        evaluate_on_test,
        leaderboard,
        plot_confusion_matrix,
        plot_trial_curves,
        select_best_trial,
    )
    from components.models import build_model
    from components.models.transfer import pretrained_weights_file
    from components.registry import register_challenger
    from components.tracking import ROLE_TAG, Tracker
    from components.training.trainer import worker_resources
    from components.training.worker import TrainJob, load_best_weights
    from components.tuning.driver import TrackingTarget, ray_session, run_search
    from components.tuning.plan import plan_resources
    from components.tuning.space import (
        check_search,
        check_space,
        count_trials,
        grid_points,
        parse_space,
        set_params,
    )

    started = time.time()
    # Validate the search space against the config before touching data, Ray or MLflow.
    axes = parse_space(cfg.search.space)
    base_sections = {s: getattr(cfg, s) for s in ("data", "augment", "model", "train")}
    check_space(axes, base_sections, cfg.search.mode)
    check_search(cfg.search, axes)
    # Pretrained weights are needed on every worker: a missing file fails here, not in
    # every trial.
    for point in grid_points(axes, cfg.search.mode, base_sections) or [{}]:
        m = set_params(base_sections, point)["model"]
        if m.pretrained:
            pretrained_weights_file(m.name, m.weights_path)
    num_trials = count_trials(axes, cfg.search.mode, cfg.search.num_samples, base_sections,
                              cfg.search.max_trials)

    pipeline_id = resume or new_pipeline_id()
    tracker = Tracker(cfg.tracking.uri)
    experiment_id = tracker.ensure_experiment(cfg.tracking.experiment_name,
                                              cfg.tracking.artifact_location)
    parent = None
    if resume:
        found = tracker.client.search_runs(
            [experiment_id], f"tags.`visiontune.pipeline_id` = '{pipeline_id}' and "
                             f"tags.`{ROLE_TAG}` = 'pipeline'", max_results=1)
        parent = found[0].info.run_id if found else None
        if parent:
            tracker.client.update_run(parent, status="RUNNING")
            echo(f"[visiontune] resuming pipeline {pipeline_id} (MLflow run {parent})")
    if parent is None:
        from pipelines.jobs import CLUSTER_ENV, JOB_ID_ENV

        tags = {ROLE_TAG: "pipeline", "visiontune.pipeline_id": pipeline_id,
                **(extra_tags or {})}
        if os.environ.get(JOB_ID_ENV):  # submitted with `visiontune submit`
            tags["visiontune.ray_job_id"] = os.environ[JOB_ID_ENV]
            tags["visiontune.ray_cluster_address"] = os.environ.get(CLUSTER_ENV, "")
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        parent = tracker.create_run(experiment_id, pipeline_id, tags)
        config_dict = to_dict(cfg)
        tracker.log_params(parent, config_dict)
        tracker.log_text(parent, yaml.safe_dump(config_dict, sort_keys=False), "config.yaml")
    echo(f"[visiontune] pipeline {pipeline_id}: MLflow run {parent} at {cfg.tracking.uri}")
    step = _Steps(tracker, parent, echo)

    try:
        with step("ingest"):
            root = cfg.data.path or str(write_digits_folder(cfg.data.cache_dir))
            index = index_images(root)
            echo(f"  {len(index)} image files in {len(index.classes)} classes under {root}")
        with step("validate"):
            images = validate_images(index, cfg.data.on_bad_image, min_images_per_class(
                cfg.data.val_fraction, cfg.data.test_fraction))
            for path, reason in images.skipped[:10]:
                echo(f"  skipped {path}: {reason}")
            if len(images.skipped) > 10:
                echo(f"  ... and {len(images.skipped) - 10} more skipped")
            tracker.log_metrics(parent, {"data_num_images": len(images.index),
                                         "data_num_skipped": len(images.skipped)})
            if images.skipped:
                tracker.log_text(parent, "\n".join(f"{p}\t{r}" for p, r in images.skipped),
                                 "data/skipped_images.tsv")
        with step("split"):
            manifest = split_dataset(images, cfg.data.val_fraction, cfg.data.test_fraction,
                                     cfg.seed)
            echo(f"  split {manifest.counts()}, fingerprint {manifest.fingerprint[:12]}")
            tracker.set_tags(parent, {"visiontune.data_fingerprint": manifest.fingerprint})
            tracker.log_params(parent, {"data_fingerprint": manifest.fingerprint,
                                        "data_classes": ",".join(manifest.classes)})
            with tempfile.TemporaryDirectory() as d:
                tracker.log_artifact(parent, manifest.save_csv(Path(d) / "split_manifest.csv"),
                                     "data")

        with step("tune"):
            job = TrainJob(
                data=cfg.data, augment=cfg.augment, model=cfg.model, train=cfg.train,
                average=cfg.evaluation.average, seed=cfg.seed,
                train_rows=manifest.subset("train"), val_rows=manifest.subset("val"),
                num_classes=len(manifest.classes), tracking_uri=cfg.tracking.uri)
            target = TrackingTarget(tracker, experiment_id, parent)
            with ray_session(cfg.ray.address, cfg.ray.num_cpus) as resources:
                plan = plan_resources(
                    resources, num_trials, cfg.train.num_workers,
                    worker_resources(cfg.train.cpus_per_worker, cfg.train.use_gpu,
                                     cfg.train.resources_per_worker),
                    cfg.search.max_concurrent_trials)
                echo("  " + plan.describe(cfg.train.epochs * max(cfg.data.cv_folds, 1)))
                echo(f"  search: {cfg.search.mode} with {cfg.search.algorithm}, scheduler "
                     f"{cfg.search.scheduler}" + (f", {cfg.data.cv_folds}-fold CV per trial"
                                                  if cfg.data.cv_folds else ""))
                trials = run_search(job, axes, cfg.search, plan=plan,
                                    storage_path=cfg.ray.storage_path,
                                    experiment_name=pipeline_id, seed=cfg.seed, target=target,
                                    resume=bool(resume))
            counts = {s: sum(t.status == s for t in trials) for s in ("FINISHED", "KILLED",
                                                                        "FAILED")}
            echo(f"  trials: {counts}")
            tracker.log_metrics(parent, {f"trials_{k.lower()}": v for k, v in counts.items()})

        with step("evaluate"):
            best = select_best_trial(trials)
            sections = set_params(base_sections, best.params)
            model = build_model(sections["model"], len(manifest.classes),
                                sections["data"].channels)
            model.load_state_dict(load_best_weights(best.checkpoint_path))
            model.eval()
            prep = eval_preprocessing(sections["data"], sections["model"])
            test_paths, test_labels = manifest.subset("test")
            report = evaluate_on_test(model, test_paths, test_labels, manifest.classes, prep,
                                      cfg.evaluation.average)
            test_metrics = {f"test_{k}": v for k, v in report.metrics.items()}
            tracker.log_metrics(parent, {**test_metrics, "best_val_f1": best.best_val_f1})
            tracker.log_params(parent, {"best_trial_id": best.trial_id,
                                        "test_f1_average": report.average,
                                        **{f"best.{k}": v for k, v in best.params.items()}})
            with tempfile.TemporaryDirectory() as d:
                pred_csv = Path(d) / "test_predictions.csv"
                report.predictions[["path", "label", "prediction", "probability"]].to_csv(
                    pred_csv, index=False)
                tracker.log_artifact(parent, pred_csv, "evaluation")
                board = Path(d) / "leaderboard.csv"
                leaderboard(trials).to_csv(board, index=False)
                tracker.log_artifact(parent, board, "evaluation")
            tracker.log_text(parent, report.report, "evaluation/classification_report.txt")
            for fig, name in ((plot_confusion_matrix(report.confusion, manifest.classes),
                               "evaluation/confusion_matrix.png"),
                              (plot_trial_curves(trials), "evaluation/val_f1_curves.png")):
                tracker.log_figure(parent, fig, name)
                plt.close(fig)
            echo(f"  best trial {best.trial_id}: val_f1={best.best_val_f1:.4f} "
                 f"test_f1={report.metrics['f1']:.4f} ({report.average})")

        with step("register"):
            c, size = prep["channels"], prep["image_size"]
            example = torch.zeros(2, c, size, size).numpy()
            metadata = {"class_names": manifest.classes, "preprocessing": prep,
                        "data_fingerprint": manifest.fingerprint, "pipeline_id": pipeline_id,
                        "hyperparameters": {k: str(v) for k, v in best.params.items()}}
            model_uri = tracker.log_pytorch_model(parent, model, example, metadata)
            registered = register_challenger(
                tracker, model_uri, cfg.registry.model_name, parent,
                tags={"data_fingerprint": manifest.fingerprint, "test_f1": report.metrics["f1"],
                      "test_f1_average": report.average, "val_f1": best.best_val_f1,
                      "pipeline_id": pipeline_id, "model_uri": model_uri})
            tracker.set_tags(parent, {"visiontune.model_uri": model_uri,
                                      "visiontune.registered_version": registered.version})
    except BaseException:
        tracker.end_run(parent, "KILLED" if sys.exc_info()[0] is KeyboardInterrupt
                        else "FAILED")
        raise
    tracker.end_run(parent, "FINISHED")
    return PipelineResult(
        pipeline_id=pipeline_id, parent_run_id=parent, best_params=best.params,
        best_val_f1=best.best_val_f1, test_metrics=test_metrics, model_uri=model_uri,
        registered_name=registered.name, registered_version=registered.version,
        aliases=registered.aliases, tracking_uri=cfg.tracking.uri, num_trials=len(trials),
        wall_seconds=time.time() - started)


def summary(result: PipelineResult) -> str:
    params = "\n".join(f"    {k} = {v}" for k, v in result.best_params.items()) or "    (none)"
    m = result.test_metrics
    return (
        f"\nvisiontune run {result.pipeline_id} finished in {result.wall_seconds:.0f}s "
        f"({result.num_trials} trials)\n"
        f"  best hyperparameters:\n{params}\n"
        f"  val F1:  {result.best_val_f1:.4f}\n"
        f"  test F1: {m['test_f1']:.4f}  (accuracy {m['test_accuracy']:.4f}, precision "
        f"{m['test_precision']:.4f}, recall {m['test_recall']:.4f})\n"
        f"  model:   {result.model_uri}\n"
        f"  registered: models:/{result.registered_name}/{result.registered_version} "
        f"(aliases: {', '.join(result.aliases)})\n"
        f"  look at it: {mlflow_ui_command(result.tracking_uri)}\n")
