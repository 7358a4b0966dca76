"""The steps of the training pipeline, each a function with typed inputs and outputs.

Every step records its result on the pipeline's MLflow parent run (a `PipelineRecord`) and
marks itself done there; a resumed run recovers a done step's result from that record instead
of recomputing or re-logging it. `pipelines.training` only sequences these.

  plan_search(cfg)                                  -> SearchPlan       (nothing recorded)
  prepare_data(cfg, record)                         -> SplitManifest    data/ artifacts
  tune_trials(cfg, plan, manifest, record)          -> SearchOutcome    trial child runs
  evaluate_best(cfg, plan, manifest, trials, record) -> Evaluation      evaluation/ artifacts
  register_best(cfg, manifest, evaluation, record)  -> RegisteredVersion model + registry
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components import storage
from components.config import Config, ConfigError, to_dict

Echo = Callable[[str], None]
SECTIONS = ("data", "augment", "model", "train")
SOURCE_NAME = "visiontune run"  # the entry point, as the run page's "Source" names it


def new_pipeline_id() -> str:
    return time.strftime("vt-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- the record

def open_record(cfg: Config, resume: str | None, extra_tags: dict[str, str] | None,
                echo: Echo):
    """The parent run: a new one, or with `resume` the run of that pipeline id (reopened
    unless it already finished)."""
    from components.tracking import PipelineRecord, Tracker

    tracker = Tracker(cfg.tracking.uri)
    if resume:
        record = PipelineRecord.find(tracker, resume)
        if record is None:
            raise ConfigError(f"--resume {resume}: no pipeline run with that id in the MLflow "
                              f"store {cfg.tracking.uri}")
        if record.status() != "FINISHED":
            record.reopen()
            echo(f"[visiontune] resuming pipeline {resume} (MLflow run {record.run_id})")
        return record

    from pipelines.jobs import CLUSTER_ENV, JOB_ID_ENV

    tags = dict(extra_tags or {})
    if os.environ.get(JOB_ID_ENV):  # submitted with `visiontune submit`
        tags["visiontune.ray_job_id"] = os.environ[JOB_ID_ENV]
        tags["visiontune.ray_cluster_address"] = os.environ.get(CLUSTER_ENV, "")
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    # The run page's "Source": MlflowClient.create_run sets none of these by itself.
    tags.setdefault("mlflow.source.name", SOURCE_NAME)
    tags.setdefault("mlflow.source.type", "JOB" if os.environ.get(JOB_ID_ENV) else "LOCAL")
    experiment_id = tracker.ensure_experiment(cfg.tracking.experiment_name,
                                              cfg.tracking.artifact_location)
    config = to_dict(cfg)
    pipeline_id = new_pipeline_id()
    return PipelineRecord.create(tracker, experiment_id, pipeline_id, tags, config,
                                 yaml.safe_dump(config, sort_keys=False))


# ----------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class SearchPlan:
    axes: list               # parsed search-space axes
    base: dict[str, Any]     # the config sections a trial's parameters are applied to
    num_trials: int


def plan_search(cfg: Config) -> SearchPlan:
    """Everything the search space implies, checked before data, Ray or MLflow are touched."""
    from components.models.transfer import pretrained_weights_file
    from components.tuning.space import (
        check_search,
        check_space,
        count_trials,
        grid_points,
        parse_space,
        set_params,
    )

    axes = parse_space(cfg.search.space)
    base = {s: getattr(cfg, s) for s in SECTIONS}
    check_space(axes, base, cfg.search.mode)
    check_search(cfg.search, axes)
    # Pretrained weights are needed on every worker: a missing file fails here, not in
    # every trial.
    for point in grid_points(axes, cfg.search.mode, base) or [{}]:
        m = set_params(base, point)["model"]
        if m.pretrained:
            pretrained_weights_file(m.name, m.weights_path)
    num_trials = count_trials(axes, cfg.search.mode, cfg.search.num_samples, base,
                              cfg.search.max_trials)
    # Checkpoints go there from every trial: a missing bucket or credentials fail here, once.
    storage.check_writable(cfg.ray.storage_path)
    return SearchPlan(axes, base, num_trials)


# ----------------------------------------------------------------------------- data

def progress_printer(echo: Echo, verb: str, unit: str, every_s: float = 5.0):
    """A `progress(done, total)` callback that prints a line at most every `every_s` seconds
    (and the last one, when anything was printed): long folders show they are moving."""
    started = time.monotonic()
    last = [started]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s or (done == total and last[0] > started):
            last[0] = now
            rate = done / max(now - started, 1e-9)
            left = (total - done) / rate if rate > 0 else 0
            echo(f"  {verb} {done}/{total} {unit} ({100 * done / max(total, 1):.0f}%, "
                 f"{rate:.0f}/s, ~{left:.0f} s left)")
    return progress


def prepare_data(cfg: Config, record, echo: Echo = print):
    """ingest -> validate -> split; a resumed run reads the manifest it logged instead."""
    from components.data import SplitManifest

    if record.step_done("split"):
        from components.data.preprocessed import open_store

        with tempfile.TemporaryDirectory() as d:
            record.download("data", d)
            manifest = SplitManifest.load(Path(d) / "data")
        stores = record.run().data.tags.get(DECODED_TAG, "")
        manifest.decoded = tuple(s for s in map(open_store, filter(None, stores.split("\n")))
                                 if s is not None)
        echo(f"  data: the run's manifest {manifest.counts()}, fingerprint "
             f"{manifest.fingerprint[:12]}")
        return manifest

    from components.data import (
        index_images,
        split_dataset,
        write_digits_folder,
    )
    from components.data.split import min_images_per_class
    from components.training.metrics import check_average

    d = cfg.data
    with record.step("ingest", echo):
        root = d.path or str(write_digits_folder(d.cache_dir))
        index = index_images(root)
        echo(f"  {len(index)} image files in {len(index.classes)} classes under {root}")
        test_index = index_images(d.test_path) if d.test_path else None
        if test_index is not None:
            echo(f"  test set: {len(test_index)} image files in {len(test_index.classes)} "
                 f"classes under {d.test_path}")
    with record.step("validate", echo):
        # Known only now, and cheaper to refuse here than in every trial.
        check_average(cfg.evaluation.average, len(index.classes))
        # With a separate test set, data.path only has to fill train and val.
        images = _validated(cfg, index, min_images_per_class(
            d.val_fraction, d.test_fraction if test_index is None else d.val_fraction), echo)
        test_images = None if test_index is None else _validated(cfg, test_index, 1, echo)
        _log_decoded([v for v in (images, test_images) if v is not None], record, echo)
        skipped = images.skipped + (test_images.skipped if test_images else [])
        for path, reason in skipped[:10]:
            echo(f"  skipped {path}: {reason}")
        if len(skipped) > 10:
            echo(f"  ... and {len(skipped) - 10} more skipped")
        record.log_metrics({"data_num_images": len(images.index) + (
            len(test_images.index) if test_images else 0), "data_num_skipped": len(skipped)})
        if skipped:
            record.log_text("\n".join(f"{p}\t{r}" for p, r in skipped),
                            "data/skipped_images.tsv")
    with record.step("split", echo):
        split_seed = cfg.seed if d.split_seed is None else d.split_seed
        manifest = split_dataset(images, d.val_fraction, d.test_fraction, split_seed,
                                 test_images)
        echo(f"  split {manifest.counts()} (split seed {split_seed}"
             + (f", test split from {d.test_path}" if d.test_path else "")
             + f"), fingerprint {manifest.fingerprint[:12]}, test images "
             f"{manifest.test_fingerprint[:12]}")
        record.set_tags({"visiontune.data_fingerprint": manifest.fingerprint,
                         "visiontune.test_fingerprint": manifest.test_fingerprint})
        record.log_params({"data_fingerprint": manifest.fingerprint,
                           "data_classes": ",".join(manifest.classes)})
        with tempfile.TemporaryDirectory() as d:
            for path in manifest.save(d):
                record.log_artifact(path, "data")
        log_split_datasets(manifest, record)
    return manifest


DECODED_TAG = "visiontune.decoded_images"   # the stores of decoded images, one per line


def _validated(cfg: Config, index, min_per_class: int, echo: Echo):
    """The readable images of `index`; with data.preprocess, decoded once into a store (or
    found in one an earlier run built)."""
    from components.data import validate_images
    from components.data.validate import DecodeTarget

    d = cfg.data
    target = None
    if d.preprocess:
        # On a cluster the images are decoded by Ray tasks on every node.
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        target = DecodeTarget(cfg.ray.storage_path, d.image_size, d.channels,
                              cluster=(lambda: _cluster_session(cfg)) if address else None)
    return validate_images(index, d.on_bad_image, min_per_class,
                           progress=progress_printer(echo, "read" if target else "checked",
                                                     "images"),
                           decode_to=target,
                           decoding=progress_printer(echo, "decoded", "images"))


@contextlib.contextmanager
def _cluster_session(cfg: Config):
    """The cluster's Ray for a step before the sweep; Ray's own output to the run's log."""
    from components.cluster import ray_session
    from pipelines.console import console

    log = Path(tempfile.gettempdir()) / "visiontune" / "ray-data-step.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with console.ray_output_to(log), ray_session(cfg.ray.address, cfg.ray.num_cpus):
        yield


def _log_decoded(validated: list, record, echo: Echo) -> None:
    stores = [v.decoded for v in validated if v.decoded is not None]
    for s in stores:
        size = f"{len(s.paths)} images at {s.image_size} px x {s.channels} channel(s)"
        if s.decoded:
            echo(f"  decoded {size} once for the sweep into {s.location}")
        else:
            echo(f"  reusing the decoded images of an earlier run: {s.location} ({size}; "
                 "nothing decoded)")
    if stores:
        record.set_tags({DECODED_TAG: "\n".join(s.location for s in stores)})
        record.log_metrics({"data_decoded_images": sum(s.decoded for s in stores)})


# The run page's "Datasets": one input per split, in MLflow's context words.
DATASET_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}
DIGEST_CHARS = 12  # the prefix of the data fingerprint the console shows too


def _dataset_base(manifest) -> str:
    return manifest.root.rstrip("/").rsplit("/", 1)[-1] or "images"


def test_dataset_name(manifest) -> str:
    """The test split's name as the run's datasets and the model's metrics name it."""
    return f"{_dataset_base(manifest)}-test"


def log_split_datasets(manifest, record) -> None:
    """The split manifest's train/val/test rows (path, label) as the parent run's dataset
    inputs, named after the data folder, with the data fingerprint as their digest."""
    import pandas as pd

    base = _dataset_base(manifest)
    datasets = []
    for split, context in DATASET_CONTEXTS.items():
        paths, labels = manifest.subset(split)
        frame = pd.DataFrame({"path": paths, "label": [manifest.classes[y] for y in labels]})
        datasets.append((f"{base}-{split}", context, frame))
    record.log_datasets(datasets, manifest.root, manifest.fingerprint[:DIGEST_CHARS],
                        targets="label")


# ----------------------------------------------------------------------------- tune

def tune_trials(cfg: Config, plan: SearchPlan, manifest, record, echo: Echo = print, *,
                resume: bool = False, stop_requested: Callable[[], bool] = lambda: False):
    """The Ray Tune search, one Ray Train run per trial; returns a `SearchOutcome` whose
    `complete` is False when `stop_requested` ended it early."""
    from components.cluster import ray_session
    from components.training.trainer import worker_resources
    from components.training.worker import TrainJob
    from components.tuning.driver import (
        ConsoleProgress,
        TrackingTarget,
        run_search,
    )
    from components.tuning.plan import plan_sweep
    from pipelines.console import console

    with record.step("tune", echo):
        job = TrainJob(
            data=cfg.data, augment=cfg.augment, model=cfg.model, train=cfg.train,
            average=cfg.evaluation.average, seed=cfg.seed,
            train_rows=manifest.subset("train"), val_rows=manifest.subset("val"),
            num_classes=len(manifest.classes), tracking_uri=cfg.tracking.uri,
            decoded=manifest.decoded)
        target = TrackingTarget(record.tracker, record.experiment_id, record.run_id)
        log_augmented_samples(cfg, manifest, record)
        log_path = ray_log_path(cfg, record.pipeline_id)
        if not console.verbose:
            echo(f"  Ray's and Tune's own output: {log_path} (--verbose shows it here)")
        progress = ConsoleProgress(echo, console.status, plan.axes, plan.base, cfg.train.epochs,
                                   plan.num_trials)
        with console.ray_output_to(log_path), \
                ray_session(cfg.ray.address, cfg.ray.num_cpus) as resources:
            resource_plan = plan_sweep(
                resources, plan.num_trials, cfg.train.num_workers,
                worker_resources(cfg.train.cpus_per_worker, cfg.train.use_gpu,
                                 cfg.train.resources_per_worker),
                cfg.search.max_concurrent_trials, model_params=model_sizes(cfg, plan),
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
                                 progress=progress)
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


def model_sizes(cfg: Config, plan: SearchPlan) -> tuple[int, ...]:
    """The parameter count of each model the sweep trains (`model.name` and its searched
    values), as built for this data: what the plan weighs data parallelism against."""
    from components.models import build_model

    names = {cfg.model.name}
    for axis in plan.axes:
        if axis.key == "model.name":
            names.update(axis.args if axis.kind in ("grid", "choice") else ())
    classes = 10  # the head's size barely moves the count; the data is not indexed yet here
    return tuple(sum(p.numel() for p in build_model(dataclasses.replace(cfg.model, name=n),
                                                    classes, cfg.data.channels).parameters())
                 for n in sorted(names))


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


# ----------------------------------------------------------------------------- evaluate

@dataclass
class Evaluation:
    best: Any            # TrialResult
    model: Any           # torch.nn.Module with the best epoch's weights, eval mode
    preprocessing: dict
    report: Any          # TestReport


def evaluate_best(cfg: Config, plan: SearchPlan, manifest, trials, record,
                  echo: Echo = print) -> Evaluation:
    """The best trial by val F1, loaded from its best epoch and run once on the test split.
    Recomputed on resume (deterministic, seconds); logged only once."""
    import matplotlib.pyplot as plt

    from components.augment import eval_preprocessing
    from components.evaluation import (
        evaluate_on_test,
        leaderboard,
        plot_confusion_matrix,
        plot_trial_curves,
        select_best_trial,
    )
    from components.models import build_model
    from components.training.worker import load_best_weights
    from components.tuning.space import set_params

    logged = record.step_done("evaluate")
    with record.step("evaluate", echo):
        best = select_best_trial(trials)
        sections = set_params(plan.base, best.params)
        model = build_model(sections["model"], len(manifest.classes), sections["data"].channels)
        model.load_state_dict(load_best_weights(best.checkpoint_path))
        model.eval()
        prep = eval_preprocessing(sections["data"], sections["model"])
        test_paths, test_labels = manifest.subset("test")
        report = evaluate_on_test(model, test_paths, test_labels, manifest.classes, prep,
                                  cfg.evaluation.average, decoded=manifest.decoded)
        echo(f"  best trial {best.trial_id}: val_f1={best.best_val_f1:.4f} "
             f"test_f1={report.metrics['f1']:.4f} ({report.average})")
        if logged:
            return Evaluation(best, model, prep, report)
        record.log_metrics({**{f"test_{k}": v for k, v in report.metrics.items()},
                            "best_val_f1": best.best_val_f1})
        record.log_params({"best_trial_id": best.trial_id, "test_f1_average": report.average,
                           **{f"best.{k}": v for k, v in best.params.items()}})
        with tempfile.TemporaryDirectory() as d:
            pred_csv = Path(d) / "test_predictions.csv"
            report.predictions[["path", "label", "prediction", "probability"]].to_csv(
                pred_csv, index=False)
            record.log_artifact(pred_csv, "evaluation")
            board = Path(d) / "leaderboard.csv"
            leaderboard(trials).to_csv(board, index=False)
            record.log_artifact(board, "evaluation")
        record.log_text(report.report, "evaluation/classification_report.txt")
        for fig, name in ((plot_confusion_matrix(report.confusion, manifest.classes),
                           "evaluation/confusion_matrix.png"),
                          (plot_trial_curves(trials), "evaluation/val_f1_curves.png")):
            record.log_figure(fig, name)
            plt.close(fig)
        log_review_artifacts(plan, manifest, trials, report, prep, record)
    return Evaluation(best, model, prep, report)


def log_review_artifacts(plan: SearchPlan, manifest, trials, report, prep: dict,
                         record) -> None:
    """What a reviewer opens after the confusion matrix: the search compared over its axes,
    per-class metrics, and the misclassified test images."""
    import matplotlib.pyplot as plt

    from components.data.dataset import load_image
    from components.evaluation import (
        leaderboard,
        per_class_metrics,
        plot_comparison_heatmap,
        plot_continuous_axes,
        plot_misclassified,
        plot_per_class_metrics,
    )
    from components.evaluation.comparison import PANEL_KEY

    board = leaderboard(trials)
    categorical = [a.key for a in plan.axes if a.is_categorical]
    continuous = [a.key for a in plan.axes if not a.is_categorical]
    hue = PANEL_KEY if PANEL_KEY in categorical else None
    table = per_class_metrics(report.predictions, manifest.classes)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "per_class_metrics.csv"
        table.to_csv(path, index=False)
        record.log_artifact(path, "evaluation")
    figures = {
        "evaluation/comparison_heatmap.png": plot_comparison_heatmap(board, categorical),
        "evaluation/continuous_axes.png": plot_continuous_axes(
            board, continuous, tuple(a.key for a in plan.axes if a.kind == "loguniform"), hue),
        "evaluation/per_class_metrics.png": plot_per_class_metrics(table),
        "evaluation/misclassified.png": plot_misclassified(
            report.predictions,
            lambda p: load_image(p, prep["channels"], prep["image_size"])),
    }
    for name, fig in figures.items():
        if fig is not None:  # a search with no categorical (or continuous) axis has none
            record.log_figure(fig, name)
            plt.close(fig)


# ----------------------------------------------------------------------------- register

MODEL_URI_TAG = "visiontune.model_uri"
VERSION_TAG = "visiontune.registered_version"
NOTE_TAG = "mlflow.note.content"   # the run's description in the MLflow UI (Markdown)


def register_best(cfg: Config, manifest, evaluation: Evaluation, record, echo: Echo = print):
    """Log the model and register it as `challenger` (and `champion` when there is none).
    The model is an MLflow pyfunc from code that takes raw images (bytes or paths) and carries
    its own preprocessing (`components/serving/image_classifier.py`). Idempotent: a resumed
    run that had already logged or registered reuses that."""
    from components.registry import register_challenger, version_description
    from components.serving import CODE_TAG

    with record.step("register", echo):
        tags = record.run().data.tags
        model_uri = tags.get(MODEL_URI_TAG)
        best, prep, report = evaluation.best, evaluation.preprocessing, evaluation.report
        if model_uri is None:
            metadata = {"class_names": manifest.classes, "preprocessing": prep,
                        "data_fingerprint": manifest.fingerprint,
                        "pipeline_id": record.pipeline_id,
                        "hyperparameters": {k: str(v) for k, v in best.params.items()}}
            model_uri = record.tracker.log_image_classifier(
                record.run_id, evaluation.model, manifest.classes, prep, metadata)
            if model_uri.startswith("models:/m-"):
                # MLflow's lineage: these test metrics are this model's, on these images
                # (promote reads it to check that two versions were tested on the same).
                record.tracker.log_model_metrics(
                    record.run_id, model_uri.removeprefix("models:/"),
                    {f"test_{k}": v for k, v in report.metrics.items()},
                    test_dataset_name(manifest), manifest.test_fingerprint)
            record.set_tags({MODEL_URI_TAG: model_uri})
        description = version_description(
            record.pipeline_id, len(manifest.paths), manifest.counts(), manifest.classes,
            manifest.fingerprint, report.metrics, report.average, best.best_val_f1,
            best.params, cv=best.cv, test_root=manifest.test_root)
        # What every loader will run, hashed as it lies in the artifact store: predict and
        # promote refuse the version if a file changes there.
        code = record.tracker.model_code_digest(model_uri)
        # k-fold: best_val_f1 is the folds' mean; the registered model is one fold's
        val_f1 = best.cv["cv_best_fold_val_f1"] if best.cv else best.best_val_f1
        registered = register_challenger(
            record.tracker, model_uri, cfg.registry.model_name, record.run_id,
            tags={"data_fingerprint": manifest.fingerprint,
                  "test_fingerprint": manifest.test_fingerprint,
                  "test_f1": report.metrics["f1"], "test_f1_average": report.average,
                  "val_f1": val_f1, "pipeline_id": record.pipeline_id, "model_uri": model_uri,
                  CODE_TAG: code,
                  **({"cv_mean_val_f1": best.best_val_f1} if best.cv else {})},
            description=description)
        # The run page's Description says the same, with where the model went and what to
        # open first (it read "No description").
        note = (f"Registered as **{registered.name} version {registered.version}** (aliases: "
                f"{', '.join(registered.aliases) or 'none'}).\n\n{description}\n"
                f"At a glance (Artifacts): `evaluation/comparison_heatmap.png` (the search), "
                f"`evaluation/misclassified.png`, `evaluation/per_class_metrics.png`, "
                f"`evaluation/leaderboard.csv`.\n")
        record.set_tags({VERSION_TAG: registered.version, NOTE_TAG: note})
    return registered
