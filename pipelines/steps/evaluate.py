"""The evaluate and register steps: the best trial on the test split, then its model in the
registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from components.config import Config
from components.errors import first_line
from pipelines.steps.common import Echo, SearchPlan
from pipelines.steps.data import test_dataset_name

# ----------------------------------------------------------------------------- evaluate

@dataclass
class Evaluation:
    best: Any            # TrialResult
    model: Any           # torch.nn.Module with the best epoch's weights, eval mode
    preprocessing: dict
    report: Any          # TestReport
    importance: Any = None   # components.evaluation.importance.Importance of the sweep


def evaluate_best(cfg: Config, plan: SearchPlan, manifest, trials, record,
                  echo: Echo = print, suffix: str = "") -> Evaluation:
    """The best trial by val F1, loaded from its best epoch and run once on the test split.
    Recomputed on resume (deterministic, seconds); recorded only once. `suffix`: an
    extension's ("-x1"), its step and parameters named after it."""
    from components.augment import eval_preprocessing
    from components.evaluation import evaluate_on_test, select_best_trial
    from components.models import build_model
    from components.training.checkpoint import load_best_weights
    from components.tuning.space import set_params

    def evaluate() -> Evaluation:
        best = select_best_trial(trials)
        sections = set_params(plan.base, best.params)
        model = build_model(sections["model"], len(manifest.classes), sections["data"].channels)
        model.load_state_dict(load_best_weights(best.checkpoint_path))
        model.eval()
        prep = eval_preprocessing(sections["data"], sections["model"])
        test_paths, test_labels = manifest.subset("test")
        report = evaluate_on_test(model, test_paths, test_labels, manifest.classes, prep,
                                  cfg.evaluation.average, decoded=manifest.decoded)
        low, high = report.f1_interval
        echo(f"  best trial {best.trial_id}: val_f1={best.best_val_f1:.4f} (selection score: "
             f"best of {len(trials)}, optimistic) test_f1={report.metrics['f1']:.4f} "
             f"[{low:.4f}, {high:.4f}] ({report.average}, 95% interval over test images)")
        for warning in report.warnings:
            echo(f"  note: {warning}")
        importance = sweep_importance(cfg, plan, trials, echo)
        return Evaluation(best, model, prep, report, importance)

    return record.run_step(
        "evaluate" + suffix, echo, evaluate,
        save=lambda e: _save_evaluation(plan, manifest, trials, e, record, suffix))


def param_prefix(suffix: str) -> str:
    """How an extension's evaluation names its parameters (MLflow's cannot change): "x1."."""
    return suffix.lstrip("-") + "." if suffix else ""


def sweep_importance(cfg: Config, plan: SearchPlan, trials, echo: Echo):
    """Which axes mattered (`components.evaluation.importance`), said in one line when it
    ranks them."""
    from components.evaluation import leaderboard
    from components.evaluation.importance import param_importance

    importance = param_importance(leaderboard(trials), plan.axes, seed=cfg.seed)
    if importance.ranked:   # too few trials: the reason is on the run, not the console
        echo(f"  {importance.note}")
    return importance


def _save_evaluation(plan: SearchPlan, manifest, trials, evaluation: Evaluation,
                     record, suffix: str = "") -> None:
    """The test metrics, the predictions, the leaderboard and the plots, on the parent run."""
    import matplotlib.pyplot as plt

    from components.evaluation import plot_confusion_matrix

    best, report, pre = evaluation.best, evaluation.report, param_prefix(suffix)
    record.log_metrics({**{f"test_{k}": v for k, v in report.metrics.items()},
                        "test_f1_low": report.f1_interval[0],
                        "test_f1_high": report.f1_interval[1],
                        "best_val_f1": best.best_val_f1})
    record.log_params({pre + "best_trial_id": best.trial_id,
                       pre + "test_f1_average": report.average,
                       **{f"{pre}best.{k}": v for k, v in best.params.items()}})
    record.log_table(report.predictions[["path", "label", "prediction", "probability"]],
                     "evaluation/test_predictions.csv")
    record.log_text(report.report, "evaluation/classification_report.txt")
    fig = plot_confusion_matrix(report.confusion, manifest.classes)
    record.log_figure(fig, "evaluation/confusion_matrix.png")
    plt.close(fig)
    log_review_artifacts(manifest, report, evaluation.preprocessing, record)
    log_search_review(plan, trials, evaluation.importance, record)


def log_review_artifacts(manifest, report, prep: dict, record) -> None:
    """What a reviewer opens after the confusion matrix: per-class metrics and the
    misclassified test images."""
    import matplotlib.pyplot as plt

    from components.data.dataset import load_image
    from components.evaluation import per_class_metrics, plot_misclassified, plot_per_class_metrics

    table = per_class_metrics(report.predictions, manifest.classes)
    record.log_table(table, "evaluation/per_class_metrics.csv")
    figures = {
        "evaluation/per_class_metrics.png": plot_per_class_metrics(table),
        "evaluation/misclassified.png": plot_misclassified(
            report.predictions,
            lambda p: load_image(p, prep["channels"], prep["image_size"])),
    }
    for name, fig in figures.items():
        if fig is not None:
            record.log_figure(fig, name)
            plt.close(fig)


def log_search_review(plan: SearchPlan, trials, importance, record) -> None:
    """The sweep on the parent run, every trial in it: the leaderboard, the validation curves,
    the comparison over the searched axes, which axes mattered (importance and marginal
    effects) and the trials as interactive parallel coordinates (HTML)."""
    import matplotlib.pyplot as plt

    from components.evaluation import (
        leaderboard,
        plot_comparison_heatmap,
        plot_continuous_axes,
        plot_trial_curves,
    )
    from components.evaluation.comparison import PANEL_KEY
    from components.evaluation.importance import plot_importance, plot_marginal_effects
    from components.evaluation.parallel import parallel_coordinates_html

    board = leaderboard(trials)
    categorical = [a.key for a in plan.axes if a.is_categorical]
    continuous = [a.key for a in plan.axes if not a.is_categorical]
    log_keys = tuple(a.key for a in plan.axes if a.kind == "loguniform")
    record.log_table(board, "evaluation/leaderboard.csv")
    figures = {
        "evaluation/val_f1_curves.png": plot_trial_curves(trials),
        "evaluation/comparison_heatmap.png": plot_comparison_heatmap(board, categorical),
        "evaluation/continuous_axes.png": plot_continuous_axes(
            board, continuous, log_keys, PANEL_KEY if PANEL_KEY in categorical else None)}
    if importance is not None:
        record.log_table(importance.table, "evaluation/param_importance.csv")
        record.log_table(importance.effects, "evaluation/marginal_effects.csv")
        record.log_text(importance.note + "\n", "evaluation/param_importance.txt")
        figures.update({"evaluation/param_importance.png": plot_importance(importance),
                        "evaluation/marginal_effects.png": plot_marginal_effects(importance)})
    for name, fig in figures.items():
        if fig is not None:  # a search with no categorical (or continuous) axis has none
            record.log_figure(fig, name)
            plt.close(fig)
    page = parallel_coordinates_html(board, plan.axes)
    if page is not None:
        record.log_text(page, "evaluation/parallel_coordinates.html")


# ----------------------------------------------------------------------------- register

MODEL_URI_TAG = "visiontune.model_uri"
VERSION_TAG = "visiontune.registered_version"
REGISTERED_TRIAL_TAG = "visiontune.registered_trial"   # the trial behind that version
NOTE_TAG = "mlflow.note.content"   # the run's description in the MLflow UI (Markdown)


def register_best(cfg: Config, manifest, evaluation: Evaluation, record, echo: Echo = print,
                  suffix: str = ""):
    """Log the model and register it as `challenger` (and `champion` when there is none).
    The model is an MLflow pyfunc from code that takes raw images (bytes or paths) and carries
    its own preprocessing (`components/serving/image_classifier.py`). A resumed run whose
    register step is done reads the version back from its record. `suffix`: an extension's
    step, whose model (a new best trial) is a version of its own."""
    from components.registry import RegisteredVersion, model_version_aliases

    name = cfg.registry.model_name

    def registered_before() -> RegisteredVersion:
        version = record.run().data.tags[VERSION_TAG]
        return RegisteredVersion(name, version,
                                 model_version_aliases(record.tracker, name, version))

    return record.run_step(
        "register" + suffix, echo,
        lambda: _register(name, manifest, evaluation, record, MODEL_URI_TAG + suffix),
        save=lambda registered: _save_registered(registered, manifest, evaluation, record),
        load=registered_before)


def _register(name: str, manifest, evaluation: Evaluation, record, model_tag: str):
    """The logged model, registered. Both halves are idempotent (a run interrupted between
    them, or after them, is resumed): the model logged once (its URI tagged on the run), and
    `register_challenger` returns the version this run already registered."""
    from components.registry import register_challenger
    from components.serving import CODE_TAG
    from components.serving.packaging import inspect_logged_model, log_image_classifier

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
    from components.tracking.evaluation import log_mlflow_evaluation

    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    try:
        log_mlflow_evaluation(record.tracker.uri, record.run_id, report.predictions, classes,
                              model_id, dataset)
    except Exception as e:
        record.set_tags({"visiontune.mlflow_evaluate_error": first_line(e)[:500]})


def _description(manifest, evaluation: Evaluation, record) -> str:
    from components.registry import version_description

    best, report = evaluation.best, evaluation.report
    return version_description(
        record.pipeline_id, len(manifest.paths), manifest.counts(), manifest.classes,
        manifest.fingerprint, report.metrics, report.average, best.best_val_f1,
        best.params, cv=best.cv, test_root=manifest.test_root,
        test_interval=report.f1_interval)


def _save_registered(registered, manifest, evaluation: Evaluation, record) -> None:
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
