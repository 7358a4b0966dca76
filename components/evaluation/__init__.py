"""Evaluation: choose the best trial by validation F1, evaluate it once on the test split."""

from components.evaluation.evaluate import (
    TestReport,
    evaluate_on_test,
    leaderboard,
    plot_confusion_matrix,
    plot_trial_curves,
    select_best_trial,
)

__all__ = ["TestReport", "evaluate_on_test", "leaderboard", "plot_confusion_matrix",
           "plot_trial_curves", "select_best_trial"]
