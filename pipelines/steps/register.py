"""The register step: the evaluated model logged as an MLflow pyfunc and registered as a
version (`challenger`, and `champion` when there is none), with its code hash, speed and
MLflow's own evaluation of its test predictions."""

from __future__ import annotations

from components.config import Config
from components.data.split import SplitManifest
from components.errors import first_line
from components.registry import (
    RegisteredVersion,
    model_version_aliases,
    register_challenger,
    version_description,
)
from components.serving import CODE_TAG
from components.serving.packaging import inspect_logged_model, log_image_classifier
from components.tracking.evaluation import log_mlflow_evaluation
from pipelines.steps.data import test_dataset_name
from pipelines.steps.evaluate import Evaluation

MODEL_URI_TAG = "visiontune.model_uri"
VERSION_TAG = "visiontune.registered_version"
REGISTERED_TRIAL_TAG = "visiontune.registered_trial"   # the trial behind that version
NOTE_TAG = "mlflow.note.content"   # the run's description in the MLflow UI (Markdown)


def register_best(cfg: Config, manifest: SplitManifest, evaluation: Evaluation, record, *,
                  suffix: str = "") -> RegisteredVersion:
    """Log the model and register it as `challenger` (and `champion` when there is none).
    The model is an MLflow pyfunc from code that takes raw images (bytes or paths) and carries
    its own preprocessing (`components/serving/image_classifier.py`). A resumed run whose
    register step is done reads the version back from its record. `suffix`: an extension's
    step, whose model (a new best trial) is a version of its own."""
    name = cfg.registry.model_name

    def registered_before() -> RegisteredVersion:
        version = record.run().data.tags[VERSION_TAG]
        return RegisteredVersion(name, version,
                                 model_version_aliases(record.tracker, name, version))

    return record.run_step(
        "register" + suffix,
        lambda: _register(name, manifest, evaluation, record, MODEL_URI_TAG + suffix),
        save=lambda registered: _save_registered(registered, manifest, evaluation, record),
        load=registered_before)


def _register(name: str, manifest: SplitManifest, evaluation: Evaluation, record,
              model_tag: str) -> RegisteredVersion:
    """The logged model, registered. Both halves are idempotent (a run interrupted between
    them, or after them, is resumed): the model logged once (its URI tagged on the run), and
    `register_challenger` returns the version this run already registered."""
    best, prep, report = evaluation.best, evaluation.preprocessing, evaluation.report
    model_uri = record.run().data.tags.get(model_tag)
    if model_uri is None:
        metadata = {"class_names": manifest.classes, "preprocessing": prep,
                    "data_fingerprint": manifest.fingerprint,
                    "pipeline_id": record.pipeline_id,
                    "hyperparameters": {k: str(v) for k, v in best.params.items()}}
        model_uri = log_image_classifier(record.tracker, record.run_id, evaluation.model,
                                         manifest.classes, prep, metadata)
        if model_uri.startswith("models:/m-"):
            # MLflow's lineage: these test metrics are this model's, on these images
            # (promote reads it to check that two versions were tested on the same).
            record.tracker.log_model_metrics(
                record.run_id, model_uri.removeprefix("models:/"),
                {f"test_{k}": v for k, v in report.metrics.items()},
                test_dataset_name(manifest), manifest.test_fingerprint)
        _mlflow_evaluation(record, report, manifest.classes, model_uri,
                           test_dataset_name(manifest) + "-predictions")
        record.set_tags({model_tag: model_uri, MODEL_URI_TAG: model_uri})
    # What every loader will run, hashed as it lies in the artifact store: predict and
    # promote refuse the version if a file changes there. Its speed and size, measured on
    # that same copy: promote prints both versions' beside the F1 difference.
    code, speed = inspect_logged_model(record.tracker, model_uri)
    record.log_metrics(speed.metrics)
    # k-fold: best_val_f1 is the folds' mean; the registered model is one fold's
    val_f1 = best.cv["cv_best_fold_val_f1"] if best.cv else best.best_val_f1
    return register_challenger(
        record.tracker, model_uri, name, record.run_id,
        tags={"data_fingerprint": manifest.fingerprint,
              "test_fingerprint": manifest.test_fingerprint,
              "test_f1": report.metrics["f1"], "test_f1_average": report.average,
              "test_f1_interval": "[{:.4f}, {:.4f}] at 95%".format(*report.f1_interval),
              "val_f1": val_f1, "pipeline_id": record.pipeline_id, "model_uri": model_uri,
              CODE_TAG: code, **speed.tags(),
              **({"cv_mean_val_f1": best.best_val_f1} if best.cv else {})},
        description=_description(manifest, evaluation, record))


def _mlflow_evaluation(record, report, classes: list[str], model_uri: str,
                       dataset: str) -> None:
    """MLflow's own classifier metrics of these test predictions, beside ours. An extra: a
    failure is recorded on the run (tag) and registration goes on."""
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    try:
        log_mlflow_evaluation(record.tracker.uri, record.run_id, report.predictions, classes,
                              model_id, dataset)
    except Exception as e:
        record.set_tags({"visiontune.mlflow_evaluate_error": first_line(e)[:500]})


def _description(manifest: SplitManifest, evaluation: Evaluation, record) -> str:

    best, report = evaluation.best, evaluation.report
    return version_description(
        record.pipeline_id, len(manifest.paths), manifest.counts(), manifest.classes,
        manifest.fingerprint, report.metrics, report.average, best.best_val_f1,
        best.params, cv=best.cv, test_root=manifest.test_root,
        test_interval=report.f1_interval)


def _save_registered(registered: RegisteredVersion, manifest: SplitManifest,
                     evaluation: Evaluation, record) -> None:
    """The version on the parent run, and the run page's Description saying the same, with
    where the model went and what to open first (it read "No description")."""
    note = (f"Registered as **{registered.name} version {registered.version}** (aliases: "
            f"{', '.join(registered.aliases) or 'none'}).\n\n"
            f"{_description(manifest, evaluation, record)}\n"
            f"At a glance (Artifacts): `evaluation/comparison_heatmap.png` (the search), "
            f"`evaluation/misclassified.png`, `evaluation/per_class_metrics.png`, "
            f"`evaluation/leaderboard.csv`.\n")
    record.set_tags({VERSION_TAG: registered.version, NOTE_TAG: note,
                     REGISTERED_TRIAL_TAG: evaluation.best.trial_id})
