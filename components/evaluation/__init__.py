"""Evaluation: choose the best trial by validation F1, evaluate it once on the test split."""

from components.evaluation.comparison import plot_comparison_heatmap, plot_continuous_axes
from components.evaluation.errors import (
    per_class_metrics,
    plot_misclassified,
    plot_per_class_metrics,
)
from components.evaluation.evaluate import (
    TestReport,
    evaluate_on_test,
    leaderboard,
    plot_confusion_matrix,
    plot_trial_curves,
    select_best_trial,
)

__all__ = ["TestReport", "evaluate_on_test", "leaderboard", "per_class_metrics",
           "plot_comparison_heatmap", "plot_confusion_matrix", "plot_continuous_axes",
           "plot_misclassified", "plot_per_class_metrics", "plot_trial_curves",
           "select_best_trial"]
