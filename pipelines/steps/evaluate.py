"""The evaluate step: the best trial loaded from its best epoch and run once on the test split,
with the sweep's review (leaderboard, curves, importance) on the parent run."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from components.augment import eval_preprocessing
from components.config import Config
from components.data.dataset import load_image
from components.data.split import SplitManifest
from components.evaluation import (
    TestReport,
    evaluate_on_test,
    leaderboard,
    per_class_metrics,
    plot_comparison_heatmap,
    plot_confusion_matrix,
    plot_continuous_axes,
    plot_misclassified,
    plot_per_class_metrics,
    plot_trial_curves,
    select_best_trial,
)
from components.evaluation.importance import (
    Importance,
    param_importance,
    plot_importance,
    plot_marginal_effects,
)
from components.evaluation.parallel import parallel_coordinates_html
from components.evaluation.search_plots import PANEL_KEY
from components.models import build_model
from components.training.checkpoint import load_best_weights
from components.tuning.driver import TrialResult
from components.tuning.space import set_params
from pipelines.steps.common import SearchPlan
from pipelines.steps.data import PreparedData

log = logging.getLogger(__name__)   # the console's lines (pipelines/console.py)

# ----------------------------------------------------------------------------- evaluate

@dataclass
class Evaluation:
    """evaluate's output: the best trial, its model and what the test split said of it."""

    best: TrialResult
    model: torch.nn.Module   # the best epoch's weights, eval mode
    preprocessing: dict
    report: TestReport
    importance: Importance | None = None   # which searched axes mattered


def evaluate_best(cfg: Config, plan: SearchPlan, data: PreparedData,
                  trials: list[TrialResult], record, *, suffix: str = "") -> Evaluation:
    """The best trial by val F1, loaded from its best epoch and run once on the test split.
    Recomputed on resume (deterministic, seconds); recorded only once. `suffix`: an
    extension's ("-x1"), its step and parameters named after it."""
    manifest = data.manifest

    def evaluate() -> Evaluation:
        best = select_best_trial(trials)
        sections = set_params(plan.base, best.params)
        model = build_model(sections["model"], len(manifest.classes), sections["data"].channels)
        model.load_state_dict(load_best_weights(best.checkpoint_path))
        model.eval()
        prep = eval_preprocessing(sections["data"], sections["model"])
        test_paths, test_labels = manifest.subset("test")
        report = evaluate_on_test(model, test_paths, test_labels, manifest.classes, prep,
                                  cfg.evaluation.average, decoded=data.stores)
        low, high = report.f1_interval
        log.info(f"  best trial {best.trial_id}: val_f1={best.best_val_f1:.4f} (selection "
                 f"score: best of {len(trials)}, optimistic) test_f1={report.metrics['f1']:.4f} "
                 f"[{low:.4f}, {high:.4f}] ({report.average}, 95% interval over test images)")
        for warning in report.warnings:
            log.warning(f"  note: {warning}")
        importance = sweep_importance(cfg, plan, trials)
        return Evaluation(best, model, prep, report, importance)

    return record.run_step(
        "evaluate" + suffix, evaluate,
        save=lambda e: _save_evaluation(plan, manifest, trials, e, record, suffix))


def param_prefix(suffix: str) -> str:
    """How an extension's evaluation names its parameters (MLflow's cannot change): "x1."."""
    return suffix.lstrip("-") + "." if suffix else ""


def sweep_importance(cfg: Config, plan: SearchPlan,
                     trials: list[TrialResult]) -> Importance:
    """Which axes mattered (`components.evaluation.importance`), said in one line when it
    ranks them."""
    importance = param_importance(leaderboard(trials), plan.axes, seed=cfg.seed)
    if importance.ranked:   # too few trials: the reason is on the run, not the console
        log.info(f"  {importance.note}")
    return importance


def _save_evaluation(plan: SearchPlan, manifest: SplitManifest, trials: list[TrialResult],
                     evaluation: Evaluation, record, suffix: str = "") -> None:
    """The test metrics, the predictions, the leaderboard and the plots, on the parent run."""
    import matplotlib.pyplot as plt

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


def log_review_artifacts(manifest: SplitManifest, report: TestReport, prep: dict,
                         record) -> None:
    """What a reviewer opens after the confusion matrix: per-class metrics and the
    misclassified test images."""
    import matplotlib.pyplot as plt

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


def log_search_review(plan: SearchPlan, trials: list[TrialResult],
                      importance: Importance | None, record) -> None:
    """The sweep on the parent run, every trial in it: the leaderboard, the validation curves,
    the comparison over the searched axes, which axes mattered (importance and marginal
    effects) and the trials as interactive parallel coordinates (HTML)."""
    import matplotlib.pyplot as plt

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
