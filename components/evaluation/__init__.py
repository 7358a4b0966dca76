"""Evaluation: choose the best trial by validation F1, evaluate it once on the test split, and
the paired comparison of two models on the same images (`paired`).

Names are imported on first use (as in `components.data`): the CLI imports `paired`'s
constants without paying for torch and matplotlib."""

from components.lazy import lazy_names

_WHERE = {
    "plot_comparison_heatmap": "search_plots", "plot_continuous_axes": "search_plots",
    "per_class_metrics": "mistakes", "plot_misclassified": "mistakes",
    "plot_per_class_metrics": "mistakes",
    "TestReport": "scoring", "evaluate_on_test": "scoring", "leaderboard": "scoring",
    "plot_confusion_matrix": "scoring", "plot_trial_curves": "scoring",
    "select_best_trial": "scoring",
    "PairedDecision": "paired", "decide": "paired", "plot_bootstrap": "paired",
}

__getattr__, __dir__, __all__ = lazy_names(__name__, _WHERE)
